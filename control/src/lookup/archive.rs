//! Inspecting an image archive (`docker save` output, or an OCI image layout in a tar) in one
//! streaming pass: its SHA-256 and size as a whole, and the image ID inside it.
//!
//! The image ID is the digest of the image's config JSON (what `docker inspect --format
//! '{{.Id}}'` prints). It is read from `manifest.json` (Docker's format, also written by
//! Docker 25+ next to the OCI layout) or, failing that, through `index.json` and the OCI
//! manifest it points to; the config's own bytes are hashed to check the claim.

use std::{
    collections::{HashMap, HashSet},
    io::Read,
};

use sha2::{Digest as _, Sha256};

use crate::blob::Digest;

/// Entries kept in memory while streaming: the small JSON documents the image ID is found
/// through. Layers (large) are only hashed.
const MAX_KEPT_ENTRY: u64 = 1 << 20;
const MAX_KEPT_TOTAL: u64 = 16 << 20;

/// What an archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// SHA-256 of the archive file itself.
    pub digest: Digest,
    /// Size of the archive file, in bytes.
    pub size: u64,
    /// The image ID (config digest).
    pub image_id: Digest,
    /// `repo:tag` names recorded in the archive, if any.
    pub repo_tags: Vec<String>,
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[derive(serde::Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(serde::Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(serde::Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

#[derive(serde::Deserialize)]
struct OciDescriptor {
    digest: String,
}

/// Reads a whole archive from `source`. The error says why it is not an image archive.
pub fn inspect<R: Read>(source: R) -> Result<ArchiveInfo, String> {
    let mut hashing = Hashing {
        inner: source,
        hasher: Sha256::new(),
        count: 0,
    };
    let mut kept: HashMap<String, Vec<u8>> = HashMap::new();
    let mut kept_total = 0;
    // Every entry's path: a manifest may only name layers the archive holds.
    let mut present: HashSet<String> = HashSet::new();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let entries = archive
            .entries()
            .map_err(|e| format!("not a tar archive ({e})"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("not a tar archive ({e})"))?;
            let path = entry
                .path()
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .into_owned();
            let path = path.trim_start_matches("./").to_owned();
            present.insert(path.clone());
            let size = entry.header().size().unwrap_or(u64::MAX);
            let interesting = path == "manifest.json"
                || path == "index.json"
                || path.starts_with("blobs/sha256/")
                || path.ends_with(".json");
            if interesting && size <= MAX_KEPT_ENTRY && kept_total + size <= MAX_KEPT_TOTAL {
                let mut content = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut content)
                    .map_err(|e| format!("truncated archive ({e})"))?;
                kept_total += size;
                kept.insert(path, content);
            }
        }
    }
    // What follows the end-of-archive marker belongs to the file too.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| e.to_string())?;
    let (image_id, repo_tags) = image_id(&kept, &present)?;
    Ok(ArchiveInfo {
        digest: Digest::from_hasher(hashing.hasher),
        size: hashing.count,
        image_id,
        repo_tags,
    })
}

/// The image ID and tags, from the manifest; checks that the config matches its name and that
/// every layer the manifest names is in the archive (`present`: every entry's path), so an
/// archive that `docker load` would refuse is refused when it is added, not when an allocator
/// first tries to start it.
fn image_id(
    kept: &HashMap<String, Vec<u8>>,
    present: &HashSet<String>,
) -> Result<(Digest, Vec<String>), String> {
    let (config_path, tags, layers) = if let Some(manifest) = kept.get("manifest.json") {
        let manifests: Vec<DockerManifest> = serde_json::from_slice(manifest)
            .map_err(|e| format!("manifest.json is malformed ({e})"))?;
        let [first, ..] = manifests.as_slice() else {
            return Err("manifest.json lists no image".into());
        };
        (
            first.config.clone(),
            first.repo_tags.clone().unwrap_or_default(),
            first.layers.clone(),
        )
    } else if let Some(index) = kept.get("index.json") {
        let index: OciIndex =
            serde_json::from_slice(index).map_err(|e| format!("index.json is malformed ({e})"))?;
        let first = index
            .manifests
            .first()
            .ok_or("index.json lists no manifest")?;
        let manifest = kept.get(&blob_path(&first.digest)?).ok_or_else(|| {
            format!(
                "the manifest {} named by index.json is missing",
                first.digest
            )
        })?;
        let manifest: OciManifest = serde_json::from_slice(manifest)
            .map_err(|e| format!("OCI manifest is malformed ({e})"))?;
        let layers = manifest
            .layers
            .iter()
            .map(|layer| blob_path(&layer.digest))
            .collect::<Result<Vec<_>, _>>()?;
        (blob_path(&manifest.config.digest)?, Vec::new(), layers)
    } else {
        return Err(
            "no manifest.json or index.json: not a docker save or OCI image archive".into(),
        );
    };
    // `blobs/sha256/<hex>` (OCI, Docker 25+) or `<hex>.json` (older Docker).
    let hex = config_path
        .trim_start_matches("blobs/sha256/")
        .trim_end_matches(".json");
    let claimed: Digest = hex
        .parse()
        .map_err(|_| format!("config path '{config_path}' does not name a sha256 digest"))?;
    let config = kept
        .get(&config_path)
        .ok_or_else(|| format!("the image config {config_path} is missing"))?;
    let actual = Digest::of(config);
    if actual != claimed {
        return Err(format!(
            "the image config {config_path} does not match its name (its content is {actual})"
        ));
    }
    if let Some(missing) = layers
        .iter()
        .find(|layer| !present.contains(layer.trim_start_matches("./")))
    {
        return Err(format!(
            "the manifest names the layer {missing}, which is not in the archive"
        ));
    }
    Ok((claimed, tags))
}

fn blob_path(digest: &str) -> Result<String, String> {
    let digest: Digest = digest.parse()?;
    Ok(format!("blobs/sha256/{}", digest.hex()))
}

/// Writes a synthetic image archive to `out`: one config blob with `config` as content and one
/// layer of `layer_size` deterministic bytes (streamed, never held in memory), in Docker's
/// `docker save` layout (`manifest.json`) or as a bare OCI layout (`index.json`). For tests
/// and benchmarks that need archives of any size without Docker. Returns the image ID.
pub fn write_synthetic_archive<W: std::io::Write>(
    out: W,
    config: &[u8],
    layer_size: u64,
    docker_format: bool,
) -> std::io::Result<Digest> {
    let config_digest = Digest::of(config);
    let mut builder = tar::Builder::new(out);
    let mut add = |path: &str, size: u64, data: &mut dyn Read| {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, data)
    };
    let config_path = format!("blobs/sha256/{}", config_digest.hex());
    add(&config_path, config.len() as u64, &mut &config[..])?;
    // A cheap deterministic byte pattern that does not compress to nothing.
    let mut layer = std::io::repeat(0).take(layer_size);
    let mut pattern = PatternReader {
        inner: &mut layer,
        state: 0x9e37_79b9,
    };
    add("blobs/sha256/layer", layer_size, &mut pattern)?;
    if docker_format {
        let manifest = format!(
            r#"[{{"Config":"{config_path}","RepoTags":["me/app:1"],"Layers":["blobs/sha256/layer"]}}]"#
        );
        add(
            "manifest.json",
            manifest.len() as u64,
            &mut manifest.as_bytes(),
        )?;
    } else {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{config_digest}","size":1}},"layers":[]}}"#
        );
        let manifest_digest = Digest::of(manifest.as_bytes());
        let manifest_path = format!("blobs/sha256/{}", manifest_digest.hex());
        add(
            &manifest_path,
            manifest.len() as u64,
            &mut manifest.as_bytes(),
        )?;
        let index = format!(r#"{{"manifests":[{{"digest":"{manifest_digest}"}}]}}"#);
        add("index.json", index.len() as u64, &mut index.as_bytes())?;
    }
    builder.into_inner()?.flush()?;
    Ok(config_digest)
}

/// Fills what it reads with a xorshift sequence.
struct PatternReader<R> {
    inner: R,
    state: u32,
}

impl<R: Read> Read for PatternReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for byte in &mut buf[..n] {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 17;
            self.state ^= self.state << 5;
            *byte = self.state as u8;
        }
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) fn test_archive(config: &[u8], layer_size: u64, docker_format: bool) -> Vec<u8> {
    let mut out = Vec::new();
    write_synthetic_archive(&mut out, config, layer_size, docker_format).unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_and_oci_archives() {
        for docker in [true, false] {
            let bytes = test_archive(b"{\"config\":1}", 5000, docker);
            let info = inspect(bytes.as_slice()).unwrap();
            assert_eq!(info.image_id, Digest::of(b"{\"config\":1}"));
            assert_eq!(info.digest, Digest::of(&bytes));
            assert_eq!(info.size, bytes.len() as u64);
            assert_eq!(
                info.repo_tags,
                if docker {
                    vec!["me/app:1".to_owned()]
                } else {
                    vec![]
                }
            );
        }
    }

    #[test]
    fn refuses_what_is_not_an_image_archive() {
        assert!(inspect(&b"just some text, not a tar"[..]).is_err());
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_cksum();
        builder
            .append_data(&mut header, "hello.txt", &b"hi!"[..])
            .unwrap();
        let error = inspect(builder.into_inner().unwrap().as_slice()).unwrap_err();
        assert!(
            error.contains("not a docker save or OCI image archive"),
            "{error}"
        );
    }

    #[test]
    fn a_config_that_does_not_match_its_name_is_refused() {
        let mut bytes = test_archive(b"{\"config\":1}", 5, true);
        // Flip a byte of the config's content (the first entry's data block).
        bytes[512] ^= 1;
        let error = inspect(bytes.as_slice()).unwrap_err();
        assert!(error.contains("does not match its name"), "{error}");
    }

    #[test]
    fn a_manifest_naming_a_layer_not_in_the_archive_is_refused() {
        let config = b"{\"config\":1}";
        let config_path = format!("blobs/sha256/{}", Digest::of(config).hex());
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append_data(&mut header, path, data).unwrap();
        };
        add(&config_path, config);
        add("present/layer.tar", b"a layer");
        let manifest = format!(
            r#"[{{"Config":"{config_path}","Layers":["present/layer.tar","gone/layer.tar"]}}]"#
        );
        add("manifest.json", manifest.as_bytes());
        let error = inspect(builder.into_inner().unwrap().as_slice()).unwrap_err();
        assert!(
            error.contains("names the layer gone/layer.tar, which is not in the archive"),
            "{error}"
        );
    }
}
