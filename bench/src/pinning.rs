//! Pinning processes to CPUs, so that the load generator does not compete with what it
//! measures.

use std::{path::PathBuf, process::Stdio};

use crate::foreign::find_program;

/// CPU affinity: the load generator (this process) on CPU 0, every other process on the
/// remaining CPUs, with `taskset`. Children inherit the affinity of the thread that forks
/// them, so this process first moves itself to the others' CPUs, starts everything, then
/// moves itself to CPU 0. Dropped, it gives this process every CPU again (the next scenario
/// starts from a clean slate).
pub struct Pinning {
    taskset: Option<PathBuf>,
    others: String,
    all: String,
}

impl Pinning {
    pub fn new() -> Self {
        // Online CPUs, not this process's allowed ones (which pinning narrows).
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let taskset = find_program("taskset").filter(|_| cpus >= 2);
        let others = if cpus > 2 {
            format!("1-{}", cpus - 1)
        } else {
            "1".to_owned()
        };
        let all = format!("0-{}", cpus - 1);
        Self {
            taskset,
            others,
            all,
        }
    }

    /// Runs `start` (which starts the processes under test) with this process on the others'
    /// CPUs, so that they inherit them; then moves this process to CPU 0.
    pub async fn start_pinned<T>(
        &self,
        start: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.pin_self(&self.others)?;
        let started = start.await;
        self.pin_self("0")?;
        started
    }

    /// Every thread of this process on `cpus`.
    fn pin_self(&self, cpus: &str) -> anyhow::Result<()> {
        let Some(taskset) = &self.taskset else {
            return Ok(());
        };
        let status = std::process::Command::new(taskset)
            .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "taskset failed: {status}");
        Ok(())
    }

    /// What was done, with each process's allowed CPUs read back from /proc.
    pub fn describe(&self, processes: &[(String, u32)]) -> String {
        if self.taskset.is_none() {
            return "not pinned (taskset not found, or fewer than 2 CPUs): every process shares \
                    every core"
                .to_owned();
        }
        let read: Vec<String> = processes
            .iter()
            .map(|(name, pid)| {
                let cpus = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                            .map(|v| v.trim().to_owned())
                    })
                    .unwrap_or_else(|| "?".to_owned());
                format!("{name} {cpus}")
            })
            .collect();
        format!(
            "pinned with taskset: the load generator (this process, all threads) on CPU 0; \
             every process it starts (services, proxies, our bootstrap and lookup) on CPU {}, \
             all sharing it (read back: {})",
            self.others,
            read.join(", ")
        )
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        if let Err(e) = self.pin_self(&self.all) {
            eprintln!("cannot give this process every CPU again: {e:#}");
        }
    }
}
