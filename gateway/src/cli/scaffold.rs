//! `omnirelay policy new`: scaffolds a standalone policy repository — a Cargo workspace of its
//! own that builds outside this tree, one policy crate with a rule and native tests, the
//! bundle source, vectors, an evidence schema, a README of the author's loop and CI (a GitHub
//! workflow and the plain `ci/publish.sh` it runs). The templates are the files beside this
//! one, in `scaffold/`.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};

/// The toolchain the scaffold pins: the one this repository's `rust-toolchain.toml` pins, so
/// the SDK is built as it is tested.
const TOOLCHAIN: &str = "1.95.0";

/// Where the SDK comes from when no flag says: the repository this gateway is built from.
pub(super) const DEFAULT_SDK_GIT: &str = env!("CARGO_PKG_REPOSITORY");

/// Where the scaffold's policy crate takes `policy-sdk` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Sdk {
    /// A checkout's `policy-sdk/` directory.
    Path(PathBuf),
    /// A git repository holding it.
    Git(String),
}

/// Each file of the scaffold: its path in the new repository, its template, and whether it is
/// executable.
const FILES: &[(&str, &str, bool)] = &[
    (
        "Cargo.toml",
        include_str!("scaffold/Cargo.toml.tmpl"),
        false,
    ),
    (
        "rust-toolchain.toml",
        include_str!("scaffold/rust-toolchain.toml.tmpl"),
        false,
    ),
    (".gitignore", include_str!("scaffold/gitignore.tmpl"), false),
    ("README.md", include_str!("scaffold/README.md.tmpl"), false),
    (
        "bundle.source.json",
        include_str!("scaffold/bundle.source.json.tmpl"),
        false,
    ),
    (
        "@NAME@/Cargo.toml",
        include_str!("scaffold/policy.Cargo.toml.tmpl"),
        false,
    ),
    (
        "@NAME@/src/lib.rs",
        include_str!("scaffold/lib.rs.tmpl"),
        false,
    ),
    (
        "vectors/@NAME@.json",
        include_str!("scaffold/vectors.json.tmpl"),
        false,
    ),
    (
        "schemas/@NAME@-evidence.json",
        include_str!("scaffold/evidence.json.tmpl"),
        false,
    ),
    (
        ".github/workflows/policy.yml",
        include_str!("scaffold/workflow.yml.tmpl"),
        false,
    ),
    (
        "ci/publish.sh",
        include_str!("scaffold/publish.sh.tmpl"),
        true,
    ),
];

/// Writes a new policy repository named `name` into `dir` (which must not exist, or be empty);
/// returns the files written, relative to `dir`.
pub(super) fn new(dir: &Path, name: &str, sdk: &Sdk) -> anyhow::Result<Vec<PathBuf>> {
    check_name(name)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let (dependency, description) = dependency(&dir, sdk)?;
    let values = [
        ("@NAME@", name.to_string()),
        ("@TYPE@", type_name(name)),
        ("@SDK@", dependency),
        ("@SDK_DESCRIPTION@", description),
        ("@TOOLCHAIN@", TOOLCHAIN.to_string()),
        ("@RUST_VERSION@", env!("CARGO_PKG_RUST_VERSION").to_string()),
        // CI installs the gateway from where the SDK comes from, or from our repository.
        (
            "@GATEWAY_GIT@",
            match sdk {
                Sdk::Git(url) => url.clone(),
                Sdk::Path(_) => DEFAULT_SDK_GIT.to_string(),
            },
        ),
    ];
    let fill = |text: &str| {
        values
            .iter()
            .fold(text.to_string(), |t, (key, value)| t.replace(key, value))
    };
    let mut written = Vec::new();
    for (path, template, executable) in FILES {
        let relative = PathBuf::from(fill(path));
        let file = dir.join(&relative);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&file, fill(template))
            .with_context(|| format!("writing {}", file.display()))?;
        if *executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(relative);
    }
    Ok(written)
}

/// A name is the crate's, the bundle's and the policy's: lowercase ASCII letters, digits and
/// single `-` between them, starting with a letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && !name.contains("--")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!(
            "--name {name:?}: use lowercase letters, digits and '-', starting with a letter \
             (it names the crate, the bundle and the policy)"
        );
    }
    Ok(())
}

/// `edge-gate` → `EdgeGate`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The `policy-sdk` dependency (a TOML inline table) and how the README names it. A relative
/// `--sdk-path` stays relative (to the new workspace), so a scaffold inside a checkout moves
/// with it; an absolute one stays absolute.
fn dependency(dir: &Path, sdk: &Sdk) -> anyhow::Result<(String, String)> {
    let quote = |text: &str| toml::Value::String(text.to_string()).to_string();
    match sdk {
        Sdk::Git(url) => Ok((format!("{{ git = {} }}", quote(url)), url.clone())),
        Sdk::Path(path) => {
            let real = path
                .canonicalize()
                .with_context(|| format!("--sdk-path {}: no such directory", path.display()))?;
            let manifest = std::fs::read_to_string(real.join("Cargo.toml"))
                .with_context(|| format!("--sdk-path {}: no Cargo.toml", path.display()))?;
            if !manifest.contains("name = \"policy-sdk\"") {
                bail!(
                    "--sdk-path {}: not the policy-sdk crate (its Cargo.toml names another package)",
                    path.display()
                );
            }
            let written = if path.is_absolute() {
                real
            } else {
                relative(dir, &real)
            };
            let text = written.display().to_string();
            Ok((format!("{{ path = {} }}", quote(&text)), text))
        }
    }
}

/// `to` as a path relative to the directory `from` (both absolute, resolved).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to[common..] {
        out.push(part.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_crate_and_type_names() {
        assert_eq!(type_name("edge-gate"), "EdgeGate");
        assert_eq!(type_name("p2"), "P2");
        for bad in ["", "Edge", "2fa", "a--b", "a-", "a_b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("edge-gate-2").unwrap();
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        assert_eq!(
            relative(Path::new("/r/examples/repo"), Path::new("/r/policy-sdk")),
            Path::new("../../policy-sdk")
        );
        assert_eq!(relative(Path::new("/a"), Path::new("/a/b")), Path::new("b"));
    }

    #[test]
    fn the_pinned_toolchain_is_this_repositorys() {
        let ours = include_str!("../../../rust-toolchain.toml");
        assert!(
            ours.contains(&format!("channel = \"{TOOLCHAIN}\"")),
            "rust-toolchain.toml pins another toolchain than the scaffold's {TOOLCHAIN}"
        );
    }

    #[test]
    fn every_placeholder_is_filled() {
        let dir = std::env::temp_dir().join(format!("omnirelay-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sdk = Sdk::Path(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policy-sdk"
        )));
        let written = new(&dir, "edge-gate", &sdk).unwrap();
        assert!(written.contains(&PathBuf::from("edge-gate/src/lib.rs")));
        for file in &written {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            for key in [
                "@NAME@",
                "@TYPE@",
                "@SDK@",
                "@SDK_DESCRIPTION@",
                "@TOOLCHAIN@",
                "@RUST_VERSION@",
                "@GATEWAY_GIT@",
            ] {
                assert!(!text.contains(key), "{key} left in {}", file.display());
            }
        }
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let parsed: toml::Table = toml::from_str(&cargo).unwrap();
        assert!(
            parsed["workspace"]["dependencies"]["policy-sdk"]["path"]
                .as_str()
                .unwrap()
                .ends_with("policy-sdk")
        );
        assert!(
            new(&dir, "edge-gate", &sdk).is_err(),
            "a non-empty directory was reused"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
