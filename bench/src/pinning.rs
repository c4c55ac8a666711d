//! Pinning processes to CPUs, so that the load generator does not compete with what it
//! measures.

use std::{io, ops::Range};

/// CPU affinity: the load generator (this process) on CPU 0, every other process on the
/// remaining CPUs. Children inherit the affinity of the thread that forks them, so this
/// process first moves itself to the others' CPUs, starts everything, then moves itself to
/// CPU 0. Dropped, it gives this process every CPU again (the next scenario starts from a
/// clean slate).
pub struct Pinning {
    /// `None` with fewer than two CPUs: nothing is pinned.
    others: Option<Range<usize>>,
    all: Range<usize>,
}

impl Pinning {
    pub fn new() -> Self {
        // Online CPUs, not this process's allowed ones (which pinning narrows).
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        Self {
            others: (cpus >= 2).then_some(1..cpus),
            all: 0..cpus,
        }
    }

    /// Runs `start` (which starts the processes under test) with this process on the others'
    /// CPUs, so that they inherit them; then moves this process to CPU 0.
    pub async fn start_pinned<T>(
        &self,
        start: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let Some(others) = &self.others else {
            return start.await;
        };
        pin_self(others.clone())?;
        let started = start.await;
        pin_self(0..1)?;
        started
    }

    /// What was done, with each process's allowed CPUs read back from /proc.
    pub fn describe(&self, processes: &[(String, u32)]) -> String {
        let Some(others) = &self.others else {
            return "not pinned (fewer than 2 CPUs): every process shares every core".to_owned();
        };
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
            "pinned (sched_setaffinity): the load generator (this process, all threads) on CPU 0; \
             every process it starts (services, proxies, our bootstrap and lookup) on CPU {}, \
             all sharing it (read back: {})",
            cpu_list(others),
            read.join(", ")
        )
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        if self.others.is_some()
            && let Err(e) = pin_self(self.all.clone())
        {
            eprintln!("cannot give this process every CPU again: {e:#}");
        }
    }
}

/// `1` or `1-3`, as taskset writes CPU lists.
fn cpu_list(cpus: &Range<usize>) -> String {
    match cpus.len() {
        1 => cpus.start.to_string(),
        _ => format!("{}-{}", cpus.start, cpus.end - 1),
    }
}

/// Every thread of this process on `cpus` (what `taskset -a -p` does, but a thread that ends
/// while this runs, as Tokio's idle blocking threads do, is no error: `taskset` failed the
/// whole run on one).
fn pin_self(cpus: Range<usize>) -> anyhow::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes within it for
    // CPU numbers below CPU_SETSIZE, which online CPUs are.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    for entry in std::fs::read_dir("/proc/self/task")? {
        let name = entry?.file_name();
        let Some(tid) = name.to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t of the size given.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ESRCH) {
                anyhow::bail!("cannot pin thread {tid}: {error}");
            }
        }
    }
    Ok(())
}
