//! scripts/run.sh, the one command for a whole local network: it starts, serves the curl line
//! it prints, stops cleanly on Ctrl-C (SIGINT to its process group) with nothing left running,
//! and a second run works without any cleanup by hand.

mod support;

use std::{os::unix::process::CommandExt, path::Path, time::Duration};

use support::*;

const DEADLINE: Duration = Duration::from_secs(120);

/// What of a run is still there: processes naming its work directory, and (when the run used
/// the Docker engine) containers labelled with its allocator; a `docker ps` that fails fails
/// the test rather than reading as "none".
fn leftovers(work: &str, allocator: &str, docker: bool) -> (Vec<String>, Vec<String>) {
    let processes = std::process::Command::new("pgrep")
        .args(["-f", work])
        .output()
        .unwrap();
    let processes = String::from_utf8_lossy(&processes.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let containers = if docker {
        let filter = format!("label=mtc.allocator={allocator}");
        docker_ok(&["ps", "-aq", "--filter", &filter])
            .lines()
            .map(str::to_owned)
            .collect()
    } else {
        Vec::new()
    };
    (processes, containers)
}

/// One run; `docker` false hides the engine from the script (the process runtime then).
async fn one_run(script: &Path, bin_dir: &Path, docker: bool) {
    let mut command = tokio::process::Command::new(script);
    command
        .env("MTC_BIN_DIR", bin_dir)
        .env_remove("P2P_BOOTSTRAPS")
        .env_remove("P2P_PSK")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Ok(tar) = std::env::var("MTC_TEST_IMAGE_TAR") {
        command.env("MTC_IMAGE_TAR", tar);
    }
    if !docker {
        command.env("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    }
    // Its own process group, as a terminal's foreground job: Ctrl-C signals the group.
    command.as_std_mut().process_group(0);
    let child = command.spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    let run = Process::from_child(child);

    run.line_containing("curl 127.0.0.1:4200/hello-world-server", DEADLINE)
        .await;
    let line = run.line_containing("Logs: ", DEADLINE).await;
    let work = line["Logs: ".len()..].split(' ').next().unwrap().to_owned();
    let line = run.line_containing("Allocator: ", DEADLINE).await;
    let allocator = line["Allocator: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    let (status, body) = http_get("127.0.0.1:4200", "/hello-world-server")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "Hello, world\n"),
        "{}",
        run.stderr()
    );
    let (processes, containers) = leftovers(&work, &allocator, docker);
    if docker {
        assert_eq!(containers.len(), 1, "one container: {containers:?}");
    } else {
        let instances = std::process::Command::new("pgrep")
            .args(["-f", &format!("{work}/allocator/instances")])
            .output()
            .unwrap();
        assert!(
            !instances.stdout.is_empty(),
            "an instance process runs: {processes:?}"
        );
    }

    // Ctrl-C.
    // SAFETY: kill(2) with a valid signal has no memory-safety preconditions.
    unsafe { libc::kill(-pid, libc::SIGINT) };
    run.line_containing("stopped; nothing left running", DEADLINE)
        .await;
    let mut run = run;
    let status = tokio::time::timeout(DEADLINE, run.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "Ctrl-C ends it as interrupted: {status:?}"
    );
    wait_until("nothing left running", Duration::from_secs(30), || {
        let (processes, containers) = leftovers(&work, &allocator, docker);
        std::future::ready(processes.is_empty() && containers.is_empty())
    })
    .await;
    assert!(!Path::new(&work).exists(), "its temporary data is removed");
}

/// Both runtimes, one after the other (the network uses fixed ports): Docker when an
/// engine answers here, then processes with the engine hidden; the second run of each kind
/// needs no cleanup by hand.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_network_serves_the_curl_line_and_stops_cleanly_every_time() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin_dir = Path::new(PING_MONITOR).parent().unwrap();
    let engine = docker_engine();
    let runs: &[bool] = if engine {
        &[true, true, false]
    } else {
        &[false, false]
    };
    for &docker in runs {
        one_run(&root.join("scripts/run.sh"), bin_dir, docker).await;
    }
}
