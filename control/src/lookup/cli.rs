//! The hl-cli program: add, get, list and delete service records.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::PeerId;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::{
    archive,
    client::{self, ClientError},
    protocol::{LookupProtocol, LookupRequest, LookupResponse},
    record::{Artifact, Limits, RECORD_VERSION, ServiceProtocol, ServiceRecord, parse_bytes},
    replicate,
};
use crate::{
    blob::{Digest, hash_file, transfer},
    common::{
        overlay_args::OverlayArgs,
        program::{CommonArgs, Program},
    },
    overlay::{Node, identity::IdentitySource},
};

/// Adds, gets, lists and deletes service records at the lookup services of an overlay.
#[derive(clap::Parser, Debug)]
#[command(name = "hl-cli", version)]
pub struct Cli {
    /// Print JSON instead of text, for scripts.
    #[arg(long, global = true)]
    pub json: bool,

    /// The flags every program takes: overlay (bootstraps, network key), logs, config file.
    #[command(flatten)]
    pub common: CommonArgs,

    /// What to do: add, get, list or delete.
    #[command(subcommand)]
    pub command: Command,
}

impl Program for Cli {
    const NAME: &'static str = "hl-cli";
    const CONFIG_ENV: &'static str = "HL_CLI_CONFIG";

    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

/// The subcommands of hl-cli.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Register a service: upload its artifact to a lookup service, then write its record.
    Add(AddArgs),
    /// Show a service's record.
    Get {
        /// The service's name.
        name: String,
    },
    /// List every service.
    List,
    /// Remove a service's record (its artifact blob stays).
    Delete {
        /// The service's name.
        name: String,
    },
}

/// The arguments of `hl-cli add`: the artifact (exactly one of --file, --stdin, --exec), the
/// name, and the record's limits.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("artifact").required(true).args(["file", "stdin", "exec"])))]
pub struct AddArgs {
    /// A `docker save` (or OCI) image archive.
    #[arg(long, value_name = "IMAGE.tar")]
    pub file: Option<PathBuf>,
    /// Read the image archive from standard input.
    #[arg(long)]
    pub stdin: bool,
    /// A static executable for the allocator's process runtime, instead of an image.
    #[arg(long, value_name = "FILE")]
    pub exec: Option<PathBuf>,
    /// `[IMAGE_REF[@sha256:IMAGE_ID]] NAME`. A digest after `@sha256:` must be the archive's
    /// image ID (`docker inspect --format '{{.Id}}' IMAGE`); a registry's manifest digest
    /// cannot be checked offline.
    #[arg(value_name = "[IMAGE_REF] NAME", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// RTT under which an instance is good, e.g. 20ms.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub soft_rtt: Option<Duration>,
    /// RTT over which an instance is not used, e.g. 100ms.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub hard_rtt: Option<Duration>,
    /// CPU cores per instance, e.g. 0.5.
    #[arg(long, value_name = "CORES")]
    pub cpu: Option<f64>,
    /// Memory per instance, e.g. 256MiB.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Check the artifact and print its digest and the record, but add nothing (the original's
    /// --no-add; no lookup service is contacted).
    #[arg(long)]
    pub no_add: bool,
    /// Lookup services to store the artifact on before the record is written (the nearest
    /// that take it; fewer if fewer exist). The lookup services keep that many afterwards.
    #[arg(long, env = "MTC_COPIES", default_value_t = replicate::DEFAULT_COPIES, value_name = "N")]
    pub copies: std::num::NonZeroUsize,
    /// How the service is spoken to: HTTP requests through `proxy` (`http`: HTTP/1.1, gRPC
    /// calls over HTTP/2; `h2c` or `grpc`: every request over HTTP/2), or TCP connections and
    /// UDP datagrams through `l4-proxy` chains. Allocators start its sidecar accordingly.
    #[arg(long, value_enum, default_value = "http")]
    pub protocol: ServiceProtocol,
    /// With --exec: the command line it is started with, after `--` (default: its file
    /// name). `$SERVICE_PORT` and the other instance variables are expanded at start.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The hl-cli program: runs the subcommand at the nearest lookup service that answers (`add
/// --no-add` contacts none) and prints the result, as text or (with --json) as JSON.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Add(args) => {
            // Everything about the artifact is checked before the network is touched.
            let artifact = prepare(args).await?;
            for note in &artifact.notes {
                eprintln!("note: {note}");
            }
            if args.no_add {
                // The original's --no-add: the hash only, nothing sent.
                let record = &artifact.record;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(record)?);
                } else {
                    println!("Hashed file: {}", record.digest);
                    print_record(record);
                }
                return Ok(());
            }
            let node = connect(&cli.common.overlay).await?;
            let added = add(&node, &cli, artifact, args.copies.get()).await?;
            if added.holders.len() < args.copies.get() {
                eprintln!(
                    "note: stored {} of the {} copies asked for; the lookup services make the rest when more of them can take it ({})",
                    added.holders.len(),
                    args.copies,
                    if added.failures.is_empty() {
                        "no other lookup service found".to_owned()
                    } else {
                        added.failures.join("; ")
                    }
                );
            }
            let record = &added.record;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(record)?);
            } else {
                println!("Added {} at {}", record.name, added.holders[0]);
                print_record(record);
                print_copies(&added.holders, &[], &[]);
            }
        }
        Command::Get { name } => {
            let node = connect(&cli.common.overlay).await?;
            match ask(&node, &cli, LookupRequest::Get(name.clone())).await? {
                LookupResponse::Found(record) if cli.json => {
                    println!("{}", serde_json::to_string_pretty(&record)?)
                }
                LookupResponse::Found(record) => {
                    print_record(&record);
                    let services = client::lookup_services(&node)
                        .await
                        .map_err(|e| no_service_hint(e, &cli.common.overlay))?;
                    let census =
                        replicate::census(&node, None, &services, record.digest, record.size).await;
                    let of = |holding| -> Vec<PeerId> {
                        census
                            .iter()
                            .filter(|(_, h)| *h == holding)
                            .map(|(peer, _)| *peer)
                            .collect()
                    };
                    print_copies(
                        &of(replicate::Holding::Held),
                        &of(replicate::Holding::Lacking),
                        &of(replicate::Holding::Gone),
                    );
                }
                LookupResponse::NotFound => bail!("no service named '{name}'"),
                other => unexpected(other)?,
            }
        }
        Command::List => {
            let node = connect(&cli.common.overlay).await?;
            match ask(&node, &cli, LookupRequest::List).await? {
                LookupResponse::Services(records) if cli.json => {
                    println!("{}", serde_json::to_string_pretty(&records)?)
                }
                LookupResponse::Services(records) => print_table(&records),
                other => unexpected(other)?,
            }
        }
        Command::Delete { name } => {
            let node = connect(&cli.common.overlay).await?;
            match ask(&node, &cli, LookupRequest::Delete(name.clone())).await? {
                LookupResponse::Deleted(0) => bail!("no service named '{name}'"),
                LookupResponse::Deleted(n) if cli.json => println!("{{\"deleted\": {n}}}"),
                LookupResponse::Deleted(_) => println!("Deleted {name}"),
                other => unexpected(other)?,
            }
        }
    }
    Ok(())
}

fn unexpected(response: LookupResponse) -> anyhow::Result<()> {
    match response {
        LookupResponse::Failed(reason) => bail!("the lookup service refused: {reason}"),
        LookupResponse::Unavailable(reason) => bail!("the lookup service failed: {reason}"),
        other => bail!("the lookup service answered out of protocol: {other:?}"),
    }
}

/// An artifact ready to upload: where its bytes are and the record that will describe it.
struct Prepared {
    path: PathBuf,
    record: ServiceRecord,
    /// What the user should know about how the arguments were taken.
    notes: Vec<String>,
    /// Keeps a spooled standard input alive until the upload is done.
    _spool: Option<tempfile::NamedTempFile>,
}

async fn prepare(args: &AddArgs) -> anyhow::Result<Prepared> {
    let (image_ref, name) = match args.args.as_slice() {
        [name] => (None, name.clone()),
        [image, name] => (Some(image.clone()), name.clone()),
        _ => unreachable!("clap takes one or two"),
    };
    let limits = Limits {
        soft_rtt: args.soft_rtt,
        hard_rtt: args.hard_rtt,
        cpu_cores: args.cpu,
        memory_bytes: args.memory,
    };
    let mut spool = None;
    let mut notes = Vec::new();
    let (path, digest, size, artifact) = if let Some(exec) = &args.exec {
        if image_ref.is_some() {
            bail!("--exec takes only NAME, not an image reference (put the command line after --)");
        }
        let path = exec.clone();
        let check = path.clone();
        let digest = tokio::task::spawn_blocking(move || hash_file(&check))
            .await?
            .with_context(|| format!("cannot read {}", path.display()))?;
        let size = std::fs::metadata(&path)?.len();
        check_executable(&path)?;
        let command = if args.command.is_empty() {
            vec![
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ]
        } else {
            args.command.clone()
        };
        (path, digest, size, Artifact::Executable { command })
    } else {
        if !args.command.is_empty() {
            bail!("a command line after -- is only for --exec");
        }
        let path = match &args.file {
            Some(path) => path.clone(),
            None => {
                let file = spool_stdin().await?;
                let path = file.path().to_owned();
                spool = Some(file);
                path
            }
        };
        let info = inspect_archive(&path).await?;
        let (image, claimed) = split_image_ref(image_ref.as_deref())?;
        let image = match claimed {
            // The original's walkthrough gives the digest `docker push` printed: a registry's
            // manifest digest, which cannot be checked offline. It is kept as the image's
            // reference; what identifies the image is the archive's own image ID (checked
            // against its config when the archive was read).
            Some(claimed) if claimed != info.image_id => {
                let repository = image.or_else(|| info.repo_tags.first().cloned());
                let reference = format!("{}@{claimed}", repository.unwrap_or_default());
                notes.push(format!(
                    "{claimed} is not the archive's image ID ({}): taken as a registry digest and \
                     recorded as the image reference {reference}; the archive is verified and \
                     identified by its image ID instead",
                    info.image_id
                ));
                Some(reference)
            }
            _ => image,
        };
        let image = image.or_else(|| info.repo_tags.first().cloned());
        (
            path,
            info.digest,
            info.size,
            Artifact::DockerArchive {
                image_id: info.image_id,
                image,
            },
        )
    };
    let record = ServiceRecord {
        version: RECORD_VERSION,
        name,
        digest,
        size,
        artifact,
        limits,
        protocol: args.protocol,
        unknown: Default::default(),
    };
    record.validate().map_err(anyhow::Error::msg)?;
    Ok(Prepared {
        path,
        record,
        notes,
        _spool: spool,
    })
}

/// What can be known at add time of a file for the process runtime: it is a program the
/// allocator can run (an ELF binary, or a script starting with `#!`), not empty or some other
/// file, whose every start would fail while requests wait for it.
fn check_executable(path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    match &head[..read] {
        [] => bail!("{} is empty: --exec needs an executable", path.display()),
        [0x7f, b'E', b'L', b'F'] => Ok(()),
        [b'#', b'!', ..] => Ok(()),
        _ => bail!(
            "{} is not an executable (neither an ELF binary nor a script starting with #!)",
            path.display()
        ),
    }
}

async fn inspect_archive(path: &Path) -> anyhow::Result<archive::ArchiveInfo> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let info = tokio::task::spawn_blocking(move || archive::inspect(std::io::BufReader::new(file)))
        .await?;
    info.map_err(|reason| anyhow::anyhow!("{}: not an image archive: {reason}", path.display()))
}

/// Splits `user/repo:tag@sha256:ID` at the last `@` (a registry host may have a `:port`).
fn split_image_ref(text: Option<&str>) -> anyhow::Result<(Option<String>, Option<Digest>)> {
    let Some(text) = text else {
        return Ok((None, None));
    };
    match text.rsplit_once('@') {
        Some((image, digest)) => {
            let digest: Digest = digest.parse().map_err(anyhow::Error::msg)?;
            Ok(((!image.is_empty()).then(|| image.to_owned()), Some(digest)))
        }
        None => Ok((Some(text.to_owned()), None)),
    }
}

async fn spool_stdin() -> anyhow::Result<tempfile::NamedTempFile> {
    tokio::task::spawn_blocking(|| {
        let mut file = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
        std::io::copy(&mut std::io::stdin().lock(), &mut file)
            .context("cannot read standard input")?;
        Ok(file)
    })
    .await?
}

/// Joins the overlay as a short-lived client (no DHT service, no listener).
async fn connect(overlay: &OverlayArgs) -> anyhow::Result<Node> {
    let bootstraps = overlay.bootstrap_addrs().map_err(anyhow::Error::msg)?;
    if bootstraps.is_empty() {
        bail!("no bootstrap given: pass --bootstrap MULTIADDR or set P2P_BOOTSTRAPS");
    }
    let identity = match &overlay.keyfile {
        Some(_) => overlay.identity(""),
        None => IdentitySource::Ephemeral(overlay.algo),
    };
    let mut config = crate::overlay::NodeConfig::new("hl-cli", identity.load()?);
    config.listen = Vec::new();
    config.dht_server = false;
    config.bootstraps = bootstraps;
    config.network_key = overlay.network_key()?;
    Ok(Node::start(config).await?)
}

fn no_service_hint(error: ClientError, overlay: &OverlayArgs) -> anyhow::Error {
    let tried: Vec<String> = overlay
        .bootstrap_addrs()
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    anyhow::anyhow!("{error} (bootstraps: {})", tried.join(", "))
}

async fn ask(node: &Node, cli: &Cli, request: LookupRequest) -> anyhow::Result<LookupResponse> {
    let (_, response) = client::call(node, &request)
        .await
        .map_err(|e| no_service_hint(e, &cli.common.overlay))?;
    Ok(response)
}

/// What `hl-cli add` did: the record written, the lookup services that hold the artifact
/// (the record was written at the first), and why others did not take it.
struct Added {
    record: ServiceRecord,
    holders: Vec<PeerId>,
    failures: Vec<String>,
}

/// Uploads the artifact to the `copies` nearest lookup services that take it, passing over any
/// that refuse (a full disk, say), then writes the record at the nearest holder: a record is
/// never written without its blob.
async fn add(node: &Node, cli: &Cli, prepared: Prepared, copies: usize) -> anyhow::Result<Added> {
    let record = prepared.record;
    let services = client::lookup_services(node)
        .await
        .map_err(|e| no_service_hint(e, &cli.common.overlay))?;
    let bar = if std::io::stderr().is_terminal() && !cli.json {
        ProgressBar::new(record.size).with_style(
            ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
                .expect("valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let mut failures = Vec::new();
    let mut holders = Vec::new();
    for peer in services {
        if holders.len() == copies {
            break;
        }
        let file = tokio::fs::File::open(&prepared.path)
            .await
            .with_context(|| format!("cannot read {}", prepared.path.display()))?;
        bar.set_position(0);
        let uploaded = transfer::upload(
            node,
            peer,
            record.digest,
            record.size,
            &mut file.compat(),
            |n| bar.set_position(n),
        )
        .await;
        match uploaded {
            Ok(()) => holders.push(peer),
            // The error names the lookup service already.
            Err(error) => failures.push(error.to_string()),
        }
    }
    if holders.is_empty() {
        bar.abandon();
        bail!("no lookup service took the upload: {}", failures.join("; "));
    }
    bar.finish_and_clear();
    for (i, &peer) in holders.iter().enumerate() {
        match node
            .request::<LookupProtocol>(peer, &LookupRequest::Add(record.clone()))
            .await
        {
            Ok(LookupResponse::Added) => {
                holders.swap(0, i);
                return Ok(Added {
                    record,
                    holders,
                    failures,
                });
            }
            Ok(LookupResponse::Failed(reason)) => {
                bail!("the lookup service refused the record: {reason}")
            }
            Ok(other) => failures.push(format!("{peer}: unexpected answer {other:?}")),
            Err(error) => failures.push(format!("{peer}: {error}")),
        }
    }
    bail!(
        "the artifact is stored, but no lookup service wrote the record: {}",
        failures.join("; ")
    )
}

/// Prints where the artifact's copies are: the lookup services holding it, lacking it, and
/// not answering.
fn print_copies(held: &[PeerId], lacking: &[PeerId], gone: &[PeerId]) {
    let list = |peers: &[PeerId]| {
        peers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("copies:   {} {}", held.len(), list(held));
    if !lacking.is_empty() {
        println!("lacking:  {} {}", lacking.len(), list(lacking));
    }
    if !gone.is_empty() {
        println!("silent:   {} {}", gone.len(), list(gone));
    }
}

fn describe_kind(artifact: &Artifact) -> &'static str {
    match artifact {
        Artifact::DockerArchive { .. } => "docker image archive",
        Artifact::Executable { .. } => "executable",
    }
}

fn print_record(record: &ServiceRecord) {
    println!("name:     {}", record.name);
    println!("kind:     {}", describe_kind(&record.artifact));
    println!("digest:   {}", record.digest);
    println!("size:     {} bytes", record.size);
    match &record.artifact {
        Artifact::DockerArchive { image_id, image } => {
            println!("image id: {image_id}");
            if let Some(image) = image {
                println!("image:    {image}");
            }
        }
        Artifact::Executable { command } => println!("command:  {}", command.join(" ")),
    }
    let limits = &record.limits;
    let duration = |d: Option<Duration>| {
        d.map_or("-".to_owned(), |d| {
            humantime::format_duration(d).to_string()
        })
    };
    println!("protocol: {}", record.protocol.as_str());
    println!("soft rtt: {}", duration(limits.soft_rtt));
    println!("hard rtt: {}", duration(limits.hard_rtt));
    println!(
        "cpu:      {}",
        limits
            .cpu_cores
            .map_or("-".to_owned(), |c| format!("{c} cores"))
    );
    println!(
        "memory:   {}",
        limits
            .memory_bytes
            .map_or("-".to_owned(), |m| format!("{m} bytes"))
    );
}

fn print_table(records: &[ServiceRecord]) {
    if records.is_empty() {
        println!("no services");
        return;
    }
    println!("{:<32} {:<22} {:>12}  DIGEST", "NAME", "KIND", "SIZE");
    for record in records {
        println!(
            "{:<32} {:<22} {:>12}  {}",
            record.name,
            describe_kind(&record.artifact),
            record.size,
            record.digest
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs_split_at_the_last_at_sign() {
        let digest = Digest::of(b"x");
        let text = format!("registry:5000/me/app:1@{digest}");
        let (image, claimed) = split_image_ref(Some(&text)).unwrap();
        assert_eq!(image.as_deref(), Some("registry:5000/me/app:1"));
        assert_eq!(claimed, Some(digest));
        assert_eq!(
            split_image_ref(Some("me/app:1")).unwrap(),
            (Some("me/app:1".into()), None)
        );
        assert!(split_image_ref(Some("me/app@sha256:nope")).is_err());
    }
}
