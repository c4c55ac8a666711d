//! The original system's `conf.json`, which its allocator and proxy read with `-configfile`:
//! `{"Perf":{"SoftReq":{"RTT":ms},"HardReq":{"RTT":ms}},"Bootstraps":["/ip4/.../p2p/..."]}`.
//! Its bootstraps are used when neither `--bootstrap` nor a flags file names any (before
//! P2P_BOOTSTRAPS, as the original did); its Perf is the proxy's (`proxy::config::perf`).
//! Keys it does not know are ignored, as Go's encoding/json does.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConfJson {
    #[serde(default)]
    bootstraps: Option<Vec<String>>,
}

/// Why a conf.json could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfJsonError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file, as given.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file looks like JSON but does not parse as a conf.json (malformed JSON, or
    /// `Bootstraps` that is not a list of strings).
    #[error("{path} is not the original's conf.json: {source}")]
    Invalid {
        /// The file, as given.
        path: String,
        /// What the JSON parser found wrong.
        source: serde_json::Error,
    },
}

/// Whether `text` is a JSON object (conf.json, or the seed's perf.conf), not TOML.
pub fn is_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// The bootstraps a conf.json at `path` lists (none if it lists none, or is not JSON).
pub fn bootstraps_of(path: &Path) -> Result<Vec<String>, ConfJsonError> {
    let display = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfJsonError::Read {
        path: display(),
        source,
    })?;
    if !is_json(&text) {
        return Ok(Vec::new());
    }
    let conf: ConfJson = serde_json::from_str(&text).map_err(|source| ConfJsonError::Invalid {
        path: display(),
        source,
    })?;
    Ok(conf.bootstraps.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstraps_come_from_a_conf_json_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf.json");
        std::fs::write(
            &path,
            r#"{"Perf":{"SoftReq":{"RTT":100},"HardReq":{"RTT":1000}},"Bootstraps":["/ip4/10.0.0.1/tcp/4001/p2p/x"]}"#,
        )
        .unwrap();
        assert_eq!(
            bootstraps_of(&path).unwrap(),
            ["/ip4/10.0.0.1/tcp/4001/p2p/x"]
        );
        std::fs::write(&path, r#"{"Perf":{},"Bootstraps":null}"#).unwrap();
        assert!(bootstraps_of(&path).unwrap().is_empty());
        std::fs::write(&path, "[defaults]\n").unwrap();
        assert!(bootstraps_of(&path).unwrap().is_empty());
        std::fs::write(&path, r#"{"Bootstraps":"#).unwrap();
        let error = bootstraps_of(&path).unwrap_err().to_string();
        assert!(error.contains("conf.json"), "{error}");
    }
}
