//! What a policy change does, for `breakwater policy diff OLD NEW` (and a policy
//! repository's CI): shards added, removed and changed; capacity per region and model
//! before and after; tenants and their limits; and every setting whose declared value
//! changed, by its TOML key.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use super::{Policy, Shard, Tenant};

/// The differences between two policy sets.
#[derive(Debug, Default, PartialEq)]
pub struct PolicyDiff {
    /// Shards only the new set has: one line each.
    pub shards_added: Vec<String>,
    /// Shards only the old set has.
    pub shards_removed: Vec<String>,
    /// Shards in both whose description changed: `id: what`.
    pub shards_changed: Vec<String>,
    /// (region, model) → capacity × weight in tokens/s, before and after.
    pub capacity: BTreeMap<(String, String), (f64, f64)>,
    /// Tenants added.
    pub tenants_added: Vec<String>,
    /// Tenants removed.
    pub tenants_removed: Vec<String>,
    /// Tenants changed: `id: what`.
    pub tenants_changed: Vec<String>,
    /// Settings changed: `section.key: old → new` (declared values; `default` when unset).
    pub settings_changed: Vec<String>,
}

impl PolicyDiff {
    /// Whether the two sets are the same in everything compared.
    pub fn is_empty(&self) -> bool {
        self.shards_added.is_empty()
            && self.shards_removed.is_empty()
            && self.shards_changed.is_empty()
            && self.capacity.values().all(|(a, b)| a == b)
            && self.tenants_added.is_empty()
            && self.tenants_removed.is_empty()
            && self.tenants_changed.is_empty()
            && self.settings_changed.is_empty()
    }
}

fn describe_shard(s: &Shard) -> String {
    format!(
        "{} (region {}, pool {}) {} — {} tok/s × weight {}",
        s.id, s.region, s.pool, s.url, s.capacity_tps, s.weight
    )
}

fn shard_changes(old: &Shard, new: &Shard) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name} {a} → {b}"));
        }
    };
    field("url", old.url.to_string(), new.url.to_string());
    field("pool", old.pool.clone(), new.pool.clone());
    field(
        "capacity_tps",
        old.capacity_tps.to_string(),
        new.capacity_tps.to_string(),
    );
    field("weight", old.weight.to_string(), new.weight.to_string());
    field(
        "gpu_probe",
        format!("{:?}", old.gpu_probe.as_ref().map(url::Url::as_str)),
        format!("{:?}", new.gpu_probe.as_ref().map(url::Url::as_str)),
    );
    field(
        "gpu_devices",
        format!("{:?}", old.gpu_devices),
        format!("{:?}", new.gpu_devices),
    );
    if old.url != new.url {
        out.push("(a new URL makes it a new shard: its load and health start over)".into());
    }
    out
}

fn describe_tenant(t: &Tenant) -> String {
    format!(
        "{} ({}, rpm {}, tpm {}, {} key(s))",
        t.id,
        t.priority.as_str(),
        t.rpm.map_or("unlimited".into(), |v| v.to_string()),
        t.tpm.map_or("unlimited".into(), |v| v.to_string()),
        t.key_digests.len()
    )
}

fn tenant_changes(old: &Tenant, new: &Tenant) -> Vec<String> {
    let mut out = Vec::new();
    let limit = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
    if old.priority != new.priority {
        out.push(format!(
            "priority {} → {}",
            old.priority.as_str(),
            new.priority.as_str()
        ));
    }
    if old.rpm != new.rpm {
        out.push(format!("rpm {} → {}", limit(old.rpm), limit(new.rpm)));
    }
    if old.tpm != new.tpm {
        out.push(format!("tpm {} → {}", limit(old.tpm), limit(new.tpm)));
    }
    if old.timeout != new.timeout {
        let ms = |t: Option<std::time::Duration>| {
            t.map_or("none".into(), |d| format!("{} ms", d.as_millis()))
        };
        out.push(format!("timeout {} → {}", ms(old.timeout), ms(new.timeout)));
    }
    let added = new
        .key_digests
        .iter()
        .filter(|d| !old.key_digests.contains(d))
        .count();
    let removed = old
        .key_digests
        .iter()
        .filter(|d| !new.key_digests.contains(d))
        .count();
    if added + removed > 0 {
        // Counts only: a diff is posted on pull requests, and digests are nobody's business.
        out.push(format!("keys +{added} −{removed}"));
    }
    out
}

/// Capacity × weight per (region, model), tokens/s.
fn capacity(p: &Policy) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for s in &p.shards {
        let Some(pool) = p.pools.iter().find(|x| x.id == s.pool) else {
            continue;
        };
        for m in &pool.models {
            *out.entry((s.region.clone(), m.clone())).or_insert(0.0) += s.capacity_tps * s.weight;
        }
    }
    out
}

/// The single-table sections of a set's sources, flattened to `section.key` → value.
pub type Settings = BTreeMap<String, String>;

/// The declared settings of a set (sections `[gateway]`, `[limits]`, `[timeouts]`,
/// `[routing]`, `[health]`, `[retries]`, `[admission]`), from its sources.
pub fn settings(sources: &[(String, String)]) -> Settings {
    const SECTIONS: [&str; 7] = [
        "gateway",
        "limits",
        "timeouts",
        "routing",
        "health",
        "retries",
        "admission",
    ];
    let mut out = Settings::new();
    for (_, text) in sources {
        let Ok(toml::Value::Table(doc)) = text.parse::<toml::Value>() else {
            continue;
        };
        for section in SECTIONS {
            if let Some(toml::Value::Table(t)) = doc.get(section) {
                for (k, v) in t {
                    out.insert(format!("{section}.{k}"), v.to_string());
                }
            }
        }
    }
    out
}

/// Compares `old` with `new` (each a compiled set and its declared settings).
pub fn diff(old: (&Policy, &Settings), new: (&Policy, &Settings)) -> PolicyDiff {
    let (o, os) = old;
    let (n, ns) = new;
    let mut d = PolicyDiff::default();
    for s in &n.shards {
        match o.shards.iter().find(|x| x.id == s.id) {
            None => d.shards_added.push(describe_shard(s)),
            Some(prev) => {
                let changes = shard_changes(prev, s);
                if !changes.is_empty() {
                    d.shards_changed
                        .push(format!("{}: {}", s.id, changes.join("; ")));
                }
            }
        }
    }
    for s in o
        .shards
        .iter()
        .filter(|s| !n.shards.iter().any(|x| x.id == s.id))
    {
        d.shards_removed.push(describe_shard(s));
    }
    let (co, cn) = (capacity(o), capacity(n));
    for key in co.keys().chain(cn.keys()) {
        let before = co.get(key).copied().unwrap_or(0.0);
        let after = cn.get(key).copied().unwrap_or(0.0);
        d.capacity.insert(key.clone(), (before, after));
    }
    for t in &n.tenants {
        match o.tenants.iter().find(|x| x.id == t.id) {
            None => d.tenants_added.push(describe_tenant(t)),
            Some(prev) => {
                let changes = tenant_changes(prev, t);
                if !changes.is_empty() {
                    d.tenants_changed
                        .push(format!("{}: {}", t.id, changes.join("; ")));
                }
            }
        }
    }
    for t in o
        .tenants
        .iter()
        .filter(|t| !n.tenants.iter().any(|x| x.id == t.id))
    {
        d.tenants_removed.push(describe_tenant(t));
    }
    for key in os.keys().chain(ns.keys()) {
        let (a, b) = (os.get(key), ns.get(key));
        if a != b
            && !d
                .settings_changed
                .iter()
                .any(|l| l.starts_with(&format!("{key}:")))
        {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(default)".into());
            d.settings_changed
                .push(format!("{key}: {} → {}", show(a), show(b)));
        }
    }
    d
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no change");
        }
        let section = |f: &mut fmt::Formatter<'_>, title: &str, lines: &[(&str, &Vec<String>)]| {
            if lines.iter().all(|(_, l)| l.is_empty()) {
                return Ok(());
            }
            writeln!(f, "{title}:")?;
            for (mark, list) in lines {
                for l in *list {
                    writeln!(f, "  {mark} {l}")?;
                }
            }
            Ok(())
        };
        section(
            f,
            "shards",
            &[
                ("+", &self.shards_added),
                ("-", &self.shards_removed),
                ("~", &self.shards_changed),
            ],
        )?;
        if self.capacity.values().any(|(a, b)| a != b) {
            writeln!(f, "capacity (tokens/s, capacity × weight):")?;
            let rw = self
                .capacity
                .keys()
                .map(|(r, _)| r.len())
                .max()
                .unwrap_or(0);
            let mw = self
                .capacity
                .keys()
                .map(|(_, m)| m.len())
                .max()
                .unwrap_or(0);
            for ((region, model), (a, b)) in &self.capacity {
                let mut line = format!("  {region:<rw$}  {model:<mw$}  {a:>8} → {b:>8}");
                if a != b {
                    if *a > 0.0 {
                        let _ = write!(line, "  ({:+.0} %)", (b / a - 1.0) * 100.0);
                    } else {
                        line.push_str("  (new)");
                    }
                }
                writeln!(f, "{line}")?;
            }
        }
        section(
            f,
            "tenants",
            &[
                ("+", &self.tenants_added),
                ("-", &self.tenants_removed),
                ("~", &self.tenants_changed),
            ],
        )?;
        section(f, "settings", &[("~", &self.settings_changed)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"
[gateway]
home_region = "east"
[admission]
queue_timeout_ms = 1000
[[regions]]
id = "east"
[[pools]]
id = "pe"
region = "east"
models = ["llama"]
[[shards]]
id = "e1"
pool = "pe"
url = "http://127.0.0.1:9001"
capacity_tps = 1000
[[shards]]
id = "e2"
pool = "pe"
url = "http://127.0.0.1:9002"
capacity_tps = 1000
[[tenants]]
id = "acme"
priority = "standard"
rpm = 60
"#;

    fn set(text: &str) -> (Policy, Settings) {
        let sources = vec![("p.toml".to_string(), text.to_string())];
        (
            super::super::from_sources(&sources).unwrap(),
            settings(&sources),
        )
    }

    #[test]
    fn names_shards_capacity_tenants_and_settings_that_changed() {
        let new = OLD
            .replace(
                "id = \"e2\"\npool = \"pe\"\nurl = \"http://127.0.0.1:9002\"\ncapacity_tps = 1000",
                "id = \"e3\"\npool = \"pe\"\nurl = \"http://127.0.0.1:9003\"\ncapacity_tps = 3000",
            )
            .replace(
                "capacity_tps = 1000\n[[shards]]",
                "capacity_tps = 500\nweight = 0.5\n[[shards]]",
            )
            .replace("rpm = 60", "rpm = 120\npriority = \"critical\"")
            .replace("priority = \"standard\"\n", "")
            .replace("queue_timeout_ms = 1000", "queue_timeout_ms = 250");
        let (o, os) = set(OLD);
        let (n, ns) = set(&new);
        let d = diff((&o, &os), (&n, &ns));
        assert_eq!(d.shards_added.len(), 1, "{d:?}");
        assert!(d.shards_added[0].starts_with("e3 "));
        assert!(d.shards_removed[0].starts_with("e2 "));
        assert_eq!(
            d.shards_changed,
            vec!["e1: capacity_tps 1000 → 500; weight 1 → 0.5"]
        );
        assert_eq!(
            d.capacity[&("east".to_string(), "llama".to_string())],
            (2000.0, 3250.0)
        );
        assert_eq!(
            d.tenants_changed,
            vec!["acme: priority standard → critical; rpm 60 → 120"]
        );
        assert_eq!(
            d.settings_changed,
            vec!["admission.queue_timeout_ms: 1000 → 250"]
        );
        let text = d.to_string();
        assert!(text.contains("(+62 %)"), "{text}");
        // The same set: no change.
        let same = diff((&o, &os), (&o, &os));
        assert!(same.is_empty());
        assert_eq!(same.to_string(), "no change\n");
    }
}
