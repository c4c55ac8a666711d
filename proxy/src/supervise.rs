//! The service a sidecar starts and supervises (`proxy ... -- COMMAND ARGS`), so that an image
//! needs no shell to start two programs and its container ends when either ends: the service
//! gets SIGTERM when the proxy stops (and dies with it even if the proxy is killed), and the
//! proxy stops when the service exits.
//!
//! Arguments may name environment variables (`$SERVICE_PORT`, `${SERVICE_PORT}`), expanded
//! here because an exec-form `CMD` in a `FROM scratch` image has no shell to do it.

use std::{process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// How long the service may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Expands `$NAME` and `${NAME}` in `arg` with `lookup`; `$$` is a literal `$`. An unset
/// variable is an error naming it, rather than an empty string the service would misread.
pub fn expand_env(arg: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in argument '{arg}'"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        if name.is_empty() {
            return Err(format!("a '$' without a variable name in argument '{arg}'"));
        }
        let value = lookup(name)
            .ok_or_else(|| format!("argument '{arg}' names ${name}, which is not set"))?;
        out.push_str(&value);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// The supervised service process.
pub struct Service {
    child: Child,
    program: String,
}

impl Service {
    /// Starts `command` (after expanding environment variables in it) with this process's
    /// environment and standard output and error.
    pub fn start(command: &[String]) -> Result<Self, String> {
        let expanded = command
            .iter()
            .map(|arg| expand_env(arg, |name| std::env::var(name).ok()))
            .collect::<Result<Vec<_>, _>>()?;
        let (program, args) = expanded.split_first().ok_or("no command after '--'")?;
        let mut spawn = Command::new(program);
        spawn.args(args).stdin(Stdio::null()).kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            spawn.pre_exec(|| {
                // The service dies with the proxy even if the proxy is killed outright.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = spawn
            .spawn()
            .map_err(|e| format!("cannot start the service '{program}': {e}"))?;
        Ok(Self {
            child,
            program: program.clone(),
        })
    }

    /// Resolves when the service exits, with a description of how.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => format!("the service '{}' exited ({status})", self.program),
            Err(error) => format!("cannot wait for the service '{}': {error}", self.program),
        }
    }

    /// Asks the service to stop (SIGTERM), killing it if it has not within a grace period.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a valid signal has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SERVICE_PORT" => Some("8080".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_are_expanded_in_both_spellings() {
        assert_eq!(expand_env("$SERVICE_PORT", env).unwrap(), "8080");
        assert_eq!(
            expand_env("--port=${SERVICE_PORT}x", env).unwrap(),
            "--port=8080x"
        );
        assert_eq!(expand_env("a$EMPTY-b", env).unwrap(), "a-b");
        assert_eq!(expand_env("cost: $$5", env).unwrap(), "cost: $5");
        assert_eq!(expand_env("plain", env).unwrap(), "plain");
    }

    #[test]
    fn unset_or_malformed_variables_are_errors_naming_them() {
        assert!(expand_env("$NOPE", env).unwrap_err().contains("$NOPE"));
        assert!(
            expand_env("${SERVICE_PORT", env)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            expand_env("$-x", env)
                .unwrap_err()
                .contains("without a variable name")
        );
    }
}
