//! Layered configuration: a flag on the command line wins over the same key in the config
//! file, which wins over the environment variable, which wins over the default.
//!
//! The config file is TOML whose keys are the long flag names (`prom-listen-addr = ":9100"`,
//! `bootstrap = ["/ip4/..."]`, `ephemeral = true`). Rather than a second, drift-prone
//! description of the settings, the file is turned into the flags it stands for and parsed by
//! the same clap definition, so a value is validated the same way wherever it came from.
//!
//! The original programs took single-dash long flags (`-bootstrap`, `-psk`); they are accepted
//! here too, see [`normalize_single_dash`].

use std::{collections::HashSet, ffi::OsString};

use clap::{CommandFactory, FromArgMatches, parser::ValueSource};

/// A configuration error that is not clap's (clap prints its own usage errors).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file, as given.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML, names an unknown key, or gives a key a value the
    /// flag does not accept.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The config file, as given.
        path: String,
        /// What is wrong, with the line and key where they are known.
        message: String,
    },
}

/// Parses the command line of `C`, filling what it leaves unset from the config file named by
/// the argument with ID `config_id` (if given), then from the environment and defaults.
///
/// Usage errors of the command line itself exit the process the way clap does (message, usage,
/// exit code 2); a bad config file is returned as an error that names the file and the key.
pub fn parse_layered<C>(args: Vec<OsString>, config_id: &str) -> Result<C, ConfigError>
where
    C: CommandFactory + FromArgMatches,
{
    parse_layered_as(C::command(), args, config_id)
}

/// [`parse_layered`] with `command` as the definition of `C` (its own, with some defaults
/// changed: [`super::program::Program::definition`]).
pub fn parse_layered_as<C>(
    command: clap::Command,
    args: Vec<OsString>,
    config_id: &str,
) -> Result<C, ConfigError>
where
    C: FromArgMatches,
{
    let args = normalize_single_dash(args, &command);
    let from_cli = command
        .clone()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let Some(path) = from_cli.get_one::<std::path::PathBuf>(config_id).cloned() else {
        return Ok(C::from_arg_matches(&from_cli).unwrap_or_else(|e| e.exit()));
    };
    let path_text = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path_text.clone(),
        source,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path_text.clone(),
        message,
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;

    let mut file_args = Vec::new();
    for (key, value) in &table {
        let line = line_of(&text, key);
        let arg = command
            .get_arguments()
            .find(|a| long_names(a).any(|name| name == key) && a.get_id() != config_id)
            .ok_or_else(|| invalid(format!("line {line}: unknown key '{key}'")))?;
        if from_cli.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        flag_args(key, value, takes_value, &mut file_args)
            .map_err(|message| invalid(format!("line {line}: key '{key}': {message}")))?;
    }
    // File flags go before the command line's, ahead of any `--` or positional argument.
    let mut combined: Vec<OsString> = args[..1].to_vec();
    combined.extend(file_args);
    combined.extend(args[1..].iter().cloned());
    let matches = command
        .try_get_matches_from(&combined)
        .map_err(|e| invalid(e.render().to_string().trim().to_owned()))?;
    C::from_arg_matches(&matches).map_err(|e| invalid(e.to_string()))
}

/// The flags one config-file entry stands for.
fn flag_args(
    key: &str,
    value: &toml::Value,
    takes_value: bool,
    out: &mut Vec<OsString>,
) -> Result<(), String> {
    let scalar = |value: &toml::Value| match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    };
    match (value, takes_value) {
        (toml::Value::Boolean(set), false) => {
            if *set {
                out.push(format!("--{key}").into());
            }
        }
        (_, false) => return Err("expected true or false".to_owned()),
        (toml::Value::Array(items), true) => {
            for item in items {
                out.push(format!("--{key}={}", scalar(item)?).into());
            }
        }
        (value, true) => out.push(format!("--{key}={}", scalar(value)?).into()),
    }
    Ok(())
}

/// The 1-based line where `key` is set in a TOML text, for error messages.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || line
                    .strip_prefix(&format!("\"{key}\""))
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |index| index + 1)
}

/// Rewrites the original system's single-dash long flags (`-bootstrap ADDR`, `-psk=x`) to the
/// double-dash form, for every long flag `command` (or a subcommand) knows. Short flags (`-h`),
/// values that merely start with a dash, and everything after `--` are left alone.
pub fn normalize_single_dash(args: Vec<OsString>, command: &clap::Command) -> Vec<OsString> {
    let mut longs = HashSet::new();
    collect_longs(command, &mut longs);
    let mut past_separator = false;
    args.into_iter()
        .enumerate()
        .map(|(index, arg)| {
            if index == 0 || past_separator {
                return arg;
            }
            let Some(text) = arg.to_str() else { return arg };
            if text == "--" {
                past_separator = true;
                return arg;
            }
            match text.strip_prefix('-') {
                Some(rest) if !rest.starts_with('-') && rest.len() > 1 => {
                    let name = rest.split('=').next().unwrap_or(rest);
                    if longs.contains(name) {
                        format!("-{text}").into()
                    } else {
                        arg
                    }
                }
                _ => arg,
            }
        })
        .collect()
}

/// An argument's long name and its aliases (an old spelling kept working).
fn long_names(arg: &clap::Arg) -> impl Iterator<Item = &str> {
    arg.get_long()
        .into_iter()
        .chain(arg.get_all_aliases().into_iter().flatten())
}

fn collect_longs(command: &clap::Command, longs: &mut HashSet<String>) {
    for arg in command.get_arguments() {
        longs.extend(long_names(arg).map(str::to_owned));
    }
    for sub in command.get_subcommands() {
        collect_longs(sub, longs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::Write;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[arg(long, env = "MTC_TEST_CONFIG_NAME", default_value = "default")]
        name: String,
        #[arg(long = "bootstrap")]
        bootstraps: Vec<String>,
        #[arg(long)]
        verbose: bool,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long = "new-name", alias = "old-name")]
        renamed: Option<String>,
        port: Option<u16>,
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("prog")
            .chain(list.iter().copied())
            .map(Into::into)
            .collect()
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn single_dash_long_flags_are_accepted() {
        let command = Cli::command();
        let out = normalize_single_dash(
            args(&[
                "-bootstrap",
                "x",
                "-name=y",
                "-h",
                "-5",
                "--count",
                "-verbose",
                "--",
                "-name",
            ]),
            &command,
        );
        let expected = args(&[
            "--bootstrap",
            "x",
            "--name=y",
            "-h",
            "-5",
            "--count",
            "--verbose",
            "--",
            "-name",
        ]);
        assert_eq!(out, expected);
    }

    #[test]
    fn an_old_spelling_kept_as_an_alias_works_everywhere() {
        for given in [
            &["--old-name", "x"][..],
            &["-old-name", "x"],
            &["-new-name=x"],
        ] {
            let cli: Cli = parse_layered(args(given), "config").unwrap();
            assert_eq!(cli.renamed.as_deref(), Some("x"), "{given:?}");
        }
        let file = config_file("old-name = \"from-file\"\n");
        let path = file.path().to_str().unwrap();
        let cli: Cli = parse_layered(args(&["--config", path]), "config").unwrap();
        assert_eq!(cli.renamed.as_deref(), Some("from-file"));
    }

    #[test]
    fn command_line_beats_file_beats_default() {
        let file = config_file(
            "name = \"from-file\"\nbootstrap = [\"a\", \"b\"]\nverbose = true\ncount = 7\n",
        );
        let path = file.path().to_str().unwrap();
        let cli: Cli =
            parse_layered(args(&["--config", path, "--count", "3", "9"]), "config").unwrap();
        assert_eq!(cli.name, "from-file");
        assert_eq!(cli.bootstraps, ["a", "b"]);
        assert!(cli.verbose);
        assert_eq!(cli.count, 3);
        assert_eq!(cli.port, Some(9));
        let cli: Cli =
            parse_layered(args(&["--config", path, "--bootstrap", "c"]), "config").unwrap();
        assert_eq!(
            cli.bootstraps,
            ["c"],
            "flags replace the file's list, not extend it"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_line_and_key() {
        let file = config_file("name = \"ok\"\n\ncolour = \"blue\"\n");
        let path = file.path().to_str().unwrap();
        let error = parse_layered::<Cli>(args(&["--config", path]), "config")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(path) && error.contains("line 3") && error.contains("'colour'"),
            "{error}"
        );

        let file = config_file("count = \"many\"\n");
        let path = file.path().to_str().unwrap();
        let error = parse_layered::<Cli>(args(&["--config", path]), "config")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(path) && error.contains("many") && error.contains("--count"),
            "{error}"
        );

        let file = config_file("verbose = \"yes\"\n");
        let path = file.path().to_str().unwrap();
        let error = parse_layered::<Cli>(args(&["--config", path]), "config")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 1") && error.contains("'verbose'"),
            "{error}"
        );

        let file = config_file("name = [unclosed\n");
        let path = file.path().to_str().unwrap();
        let error = parse_layered::<Cli>(args(&["--config", path]), "config")
            .unwrap_err()
            .to_string();
        assert!(error.contains(path) && error.contains("line 1"), "{error}");
    }

    #[test]
    fn unreadable_file_is_named() {
        let error = parse_layered::<Cli>(args(&["--config", "/nonexistent/mtc.toml"]), "config")
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/mtc.toml"), "{error}");
    }
}
