//! The service record: what a service name resolves to.
//!
//! Stored as JSON (readable with `etcdctl get`), with a format version. Fields this version
//! does not know are kept in `unknown` and written back unchanged, so an older program never
//! strips what a newer one added.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::blob::Digest;

/// Format version written by this program.
pub const RECORD_VERSION: u32 = 1;
/// Longest accepted service name.
pub const MAX_NAME_LEN: usize = 128;

/// What kind of artifact runs the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Artifact {
    /// A `docker save` / OCI image archive, for the Docker runtime.
    DockerArchive {
        /// The image ID inside the archive (its config digest, what `docker inspect` prints).
        image_id: Digest,
        /// The reference it is known by, e.g. `user/hello-world-server:1.0`, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
    },
    /// A static executable, for the process runtime, started with `command` (the executable
    /// itself is `command[0]`'s place; environment variables in arguments are expanded).
    Executable {
        /// The command line: the executable's name (replaced by the artifact when started),
        /// then its arguments.
        command: Vec<String>,
    },
}

/// Resource and latency limits of the service's instances.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// An instance within this RTT is good.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub soft_rtt: Option<Duration>,
    /// An instance over this RTT is not used.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub hard_rtt: Option<Duration>,
    /// CPU cores per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<f64>,
    /// Memory per instance, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// How a service is spoken to: what its sidecar carries, and how it checks the service.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// HTTP/1.1 requests (the default; the sidecar checks it by connecting).
    #[default]
    Http,
    /// TCP connections, through l4-proxy chains (checked by connecting).
    Tcp,
    /// UDP datagrams, through l4-proxy chains (cannot be checked: taken as serving).
    Udp,
    /// HTTP/2 without TLS, prior knowledge (gRPC servers; `grpc` is another name for it):
    /// the sidecar calls the service over one multiplexed HTTP/2 connection.
    #[serde(alias = "grpc")]
    #[value(alias = "grpc")]
    H2c,
}

impl ServiceProtocol {
    /// The name used in records and flags: `http`, `tcp`, `udp` or `h2c`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::H2c => "h2c",
        }
    }

    fn is_http(&self) -> bool {
        *self == Self::Http
    }
}

/// A service name's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The format version the record was written with ([`RECORD_VERSION`] for this program).
    pub version: u32,
    /// The service's name, the key it is stored and looked up by (see [`validate_name`]).
    pub name: String,
    /// SHA-256 of the artifact blob: the blob's name on the overlay. Instances advertise
    /// [`ServiceRecord::instance_key`], not this: one artifact may run as several services.
    pub digest: Digest,
    /// Size of the artifact blob in bytes.
    pub size: u64,
    /// What kind of artifact the blob is, and how an instance of it is started.
    pub artifact: Artifact,
    /// RTT limits for choosing instances, and resource limits per instance; none if the
    /// record sets none.
    #[serde(default)]
    pub limits: Limits,
    /// How the service is spoken to; HTTP when the record does not say (older records).
    #[serde(default, skip_serializing_if = "ServiceProtocol::is_http")]
    pub protocol: ServiceProtocol,
    /// Fields written by a newer version, kept as they were.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl ServiceRecord {
    /// The record as JSON bytes, the form it is stored in (fields written by a newer version
    /// included).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records always serialize")
    }

    /// The namespace this service's instances advertise on the overlay and ingresses look
    /// them up by: the name and a hash of how an instance runs (the artifact's digest and how
    /// it is started), so that two services sharing an artifact never share instances, and
    /// instances of a record that was replaced are not taken for the new one's.
    pub fn instance_key(&self) -> String {
        let identity = serde_json::to_vec(&(&self.digest, &self.artifact))
            .expect("digests and artifacts always serialize");
        let hash = Digest::of(&identity).hex();
        format!("instance/{}/{}", self.name, &hash[..32])
    }

    /// Parses a record from its JSON form, keeping unknown fields; the error says what is
    /// malformed. Does not [validate](ServiceRecord::validate) it.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("malformed service record: {e}"))
    }

    /// Checks what a record must satisfy before it is stored.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        if let Artifact::Executable { command } = &self.artifact
            && command.is_empty()
        {
            return Err("an executable record needs the command line it is started with".into());
        }
        if let (Some(soft), Some(hard)) = (self.limits.soft_rtt, self.limits.hard_rtt)
            && soft > hard
        {
            return Err(format!(
                "soft RTT limit {soft:?} is above the hard limit {hard:?}"
            ));
        }
        if self
            .limits
            .cpu_cores
            .is_some_and(|c| !(c > 0.0 && c.is_finite()))
        {
            return Err("CPU limit must be a positive number of cores".into());
        }
        Ok(())
    }
}

/// A service name: 1 to 128 characters, letters, digits and `. _ - :`, starting with a letter
/// or digit (it is the first path segment of requests to the proxy: `/<name>/...`).
pub fn validate_name(name: &str) -> Result<(), String> {
    let explain =
        "names are 1 to 128 letters, digits, '.', '_', '-' or ':', starting with a letter or digit";
    if name.is_empty() {
        return Err(format!("empty service name: {explain}"));
    }
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c));
    let valid_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > MAX_NAME_LEN || !valid_chars || !valid_start {
        return Err(format!("invalid service name '{name}': {explain}"));
    }
    Ok(())
}

/// Parses a size like `256MiB`, `1GB`, `512k` or a plain byte count.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 256MiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "'{text}': unknown size unit (use B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    Ok((number * factor as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ServiceRecord {
        ServiceRecord {
            version: RECORD_VERSION,
            name: "hello-world-server".into(),
            digest: Digest::of(b"archive"),
            size: 7,
            artifact: Artifact::DockerArchive {
                image_id: Digest::of(b"config"),
                image: Some("me/hello-world-server:1.0".into()),
            },
            limits: Limits {
                soft_rtt: Some(Duration::from_millis(20)),
                hard_rtt: Some(Duration::from_millis(100)),
                cpu_cores: Some(0.5),
                memory_bytes: Some(256 << 20),
            },
            protocol: ServiceProtocol::Http,
            unknown: BTreeMap::new(),
        }
    }

    #[test]
    fn instance_keys_tell_services_apart_even_with_one_artifact() {
        let first = record();
        let mut second = record();
        second.name = "other-server".into();
        let mut restarted_differently = record();
        restarted_differently.artifact = Artifact::Executable {
            command: vec!["hello".into(), "--fast".into()],
        };
        let mut limits_only = record();
        limits_only.limits.soft_rtt = Some(Duration::from_millis(5));
        assert_ne!(first.instance_key(), second.instance_key());
        assert_ne!(first.instance_key(), restarted_differently.instance_key());
        // Limits say how instances are chosen, not what runs: the instances stay the same.
        assert_eq!(first.instance_key(), limits_only.instance_key());
        assert!(
            first
                .instance_key()
                .starts_with("instance/hello-world-server/")
        );
    }

    #[test]
    fn round_trips_with_explicit_units() {
        let json = String::from_utf8(record().to_json()).unwrap();
        assert!(json.contains("\"soft_rtt\":\"20ms\""), "{json}");
        assert!(json.contains("\"kind\":\"docker-archive\""), "{json}");
        assert_eq!(ServiceRecord::from_json(json.as_bytes()).unwrap(), record());
    }

    #[test]
    fn unknown_fields_are_kept() {
        let mut value: serde_json::Value = serde_json::from_slice(&record().to_json()).unwrap();
        value["gpu"] = serde_json::json!({"count": 1});
        let parsed = ServiceRecord::from_json(value.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.unknown["gpu"], serde_json::json!({"count": 1}));
        let again: serde_json::Value = serde_json::from_slice(&parsed.to_json()).unwrap();
        assert_eq!(again["gpu"]["count"], 1);
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(record().validate().is_ok());
        for bad in ["", "-x", "a b", "ä", &"a".repeat(129), "x/y"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_name("calc-server:1.1").is_ok());
        let mut r = record();
        r.limits.soft_rtt = Some(Duration::from_secs(1));
        assert!(r.validate().unwrap_err().contains("above the hard limit"));
        let mut r = record();
        r.artifact = Artifact::Executable { command: vec![] };
        assert!(r.validate().unwrap_err().contains("command line"));
    }

    #[test]
    fn an_http2_service_is_recorded_h2c_and_grpc_is_another_name_for_it() {
        let mut r = record();
        r.protocol = ServiceProtocol::H2c;
        let json = String::from_utf8(r.to_json()).unwrap();
        assert!(json.contains(r#""protocol":"h2c""#), "{json}");
        let grpc = json.replace(r#""protocol":"h2c""#, r#""protocol":"grpc""#);
        let read: ServiceRecord = serde_json::from_str(&grpc).unwrap();
        assert_eq!(read.protocol, ServiceProtocol::H2c);
        use clap::ValueEnum;
        for flag in ["h2c", "grpc"] {
            assert_eq!(
                ServiceProtocol::from_str(flag, false),
                Ok(ServiceProtocol::H2c),
                "{flag}"
            );
        }
        assert_eq!(ServiceProtocol::H2c.as_str(), "h2c");
    }

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_bytes("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("lots").unwrap_err().contains("'lots'"));
        assert!(parse_bytes("3 parsecs").unwrap_err().contains("unit"));
    }
}
