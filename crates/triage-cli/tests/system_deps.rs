//! `scripts/system-deps`, the one step that makes sure the Debian packages
//! the build and the tests need are installed: it names every package that
//! the lock file makes necessary, it is what scripts/serve, scripts/test and
//! .ci/run call, and without root it prints the exact install command and
//! exits with status 2. Detection runs against a fake root
//! (`TRIAGE_SYSTEM_DEPS_ROOT`) as a user who is not root
//! (`TRIAGE_SYSTEM_DEPS_UID`), so nothing is installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Each package, and a file that makes it count as installed.
const PACKAGE_FILES: &[(&str, &str)] = &[
    ("cmake", "usr/bin/cmake"),
    ("make", "usr/bin/make"),
    ("g++", "usr/bin/g++"),
    ("libclang-dev", "usr/lib/llvm-16/lib/libclang-16.so.1"),
    ("libgomp1", "usr/lib/x86_64-linux-gnu/libgomp.so.1"),
    ("postgresql", "usr/lib/postgresql/16/bin/initdb"),
    ("chromium", "usr/bin/chromium"),
];

/// A fake root where exactly `installed` are present.
fn fake_root(installed: &[&str]) -> anyhow::Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    for (package, file) in PACKAGE_FILES {
        if installed.contains(package) {
            let path = root.path().join(file);
            std::fs::create_dir_all(path.parent().expect("a parent folder"))?;
            std::fs::write(&path, "")?;
        }
    }
    Ok(root)
}

fn system_deps(mode: &str, root: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(repo().join("scripts/system-deps"))
        .arg(mode)
        .env("TRIAGE_SYSTEM_DEPS_ROOT", root)
        .env("TRIAGE_SYSTEM_DEPS_UID", "1000")
        // The switches of scripts/test (and clang-sys's own variable) would
        // change what counts as needed or installed.
        .env_remove("LIBCLANG_PATH")
        .env_remove("TRIAGE_SKIP_LLAMA")
        .env_remove("TRIAGE_SKIP_POSTGRES")
        .env_remove("TRIAGE_SKIP_UI")
        .env_remove("TRIAGE_TEST_POSTGRES_URL")
        .output()?)
}

/// The packages of the `sudo apt-get install -y ...` line on stderr.
fn install_command(out: &Output) -> Option<Vec<String>> {
    String::from_utf8_lossy(&out.stderr).lines().find_map(|l| {
        l.trim()
            .strip_prefix("sudo apt-get install -y ")
            .map(|pkgs| pkgs.split_whitespace().map(str::to_owned).collect())
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The packages in Cargo.lock, by name.
fn locked_packages() -> anyhow::Result<Vec<String>> {
    let lock: toml::Table = std::fs::read_to_string(repo().join("Cargo.lock"))?.parse()?;
    Ok(lock
        .get("package")
        .and_then(|p| p.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

#[test]
fn every_native_build_in_the_lock_file_has_its_package_named() -> anyhow::Result<()> {
    let locked = locked_packages()?;
    let has = |name: &str| locked.iter().any(|p| p == name);
    // Crates that build C/C++ code, and the Debian packages they need.
    let mut build = Vec::new();
    if has("whisper-rs-sys") {
        // whisper.cpp through cmake, bindings through bindgen (libclang).
        build.extend(["cmake", "make", "g++", "libclang-dev"]);
    }
    if has("bindgen") {
        build.push("libclang-dev");
    }
    if has("cmake") {
        build.extend(["cmake", "make"]);
    }
    if has("cc") {
        build.push("g++");
    }
    assert!(
        build.contains(&"cmake") && build.contains(&"libclang-dev"),
        "Cargo.lock no longer has whisper-rs-sys? update this test: {build:?}"
    );
    // The `postgres` ledger feature is tested against a real server.
    let engine_manifest = std::fs::read_to_string(repo().join("crates/triage-engine/Cargo.toml"))?;
    let postgres_feature = engine_manifest.contains("postgres = [") && has("sqlx-postgres");

    let nothing = fake_root(&[])?;
    let out = system_deps("build", nothing.path())?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let named = install_command(&out).expect("an install command");
    for package in &build {
        assert!(
            named.iter().any(|n| n == package),
            "the build needs {package}; scripts/system-deps build names {named:?}"
        );
    }
    assert!(
        !named.iter().any(|n| n == "postgresql"),
        "only the tests need postgresql: {named:?}"
    );

    let out = system_deps("test", nothing.path())?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let named = install_command(&out).expect("an install command");
    for package in &build {
        assert!(named.iter().any(|n| n == package), "{package} in {named:?}");
    }
    // llama.cpp's source build (scripts/fetch-llama-server) links OpenMP.
    assert!(named.iter().any(|n| n == "libgomp1"), "{named:?}");
    if postgres_feature {
        assert!(
            named.iter().any(|n| n == "postgresql"),
            "the postgres feature's tests need postgresql: {named:?}"
        );
    }
    Ok(())
}

#[test]
fn without_root_it_names_only_what_is_missing_and_exits_2() -> anyhow::Result<()> {
    let root = fake_root(&["make", "g++", "libclang-dev", "libgomp1"])?;
    let out = system_deps("test", root.path())?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .lines()
            .any(|l| l == "  sudo apt-get install -y cmake postgresql chromium"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "stdout stays clean for callers");

    let out = system_deps("build", root.path())?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        install_command(&out),
        Some(vec!["cmake".to_owned()]),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// LLVM's development package brings `libclang-cpp.so.N`, the C++ library,
/// without libclang: bindgen cannot load it, so libclang-dev is still
/// missing (a fresh machine with llvm-14-dev failed the build this way).
#[test]
fn libclang_cpp_is_not_libclang() -> anyhow::Result<()> {
    let root = fake_root(&["cmake", "make", "g++"])?;
    let cpp = root.path().join("usr/lib/llvm-14/lib/libclang-cpp.so.14");
    std::fs::create_dir_all(cpp.parent().expect("a parent folder"))?;
    std::fs::write(&cpp, "")?;
    let out = system_deps("build", root.path())?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        install_command(&out),
        Some(vec!["libclang-dev".to_owned()]),
        "{}",
        stderr(&out)
    );
    // Debian's libclang1-N puts the library under the multiarch folder.
    let lib = root
        .path()
        .join("usr/lib/x86_64-linux-gnu/libclang-14.so.1");
    std::fs::create_dir_all(lib.parent().expect("a parent folder"))?;
    std::fs::write(&lib, "")?;
    let out = system_deps("build", root.path())?;
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[test]
fn with_everything_installed_it_says_nothing() -> anyhow::Result<()> {
    let all: Vec<&str> = PACKAGE_FILES.iter().map(|(p, _)| *p).collect();
    let root = fake_root(&all)?;
    for mode in ["build", "test"] {
        let out = system_deps(mode, root.path())?;
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        assert!(out.stderr.is_empty() && out.stdout.is_empty(), "{mode}");
    }
    Ok(())
}

#[test]
fn the_set_up_commands_and_ci_call_it() -> anyhow::Result<()> {
    for (script, call) in [
        ("scripts/serve", "scripts/system-deps build"),
        ("scripts/test", "scripts/system-deps test"),
        (".ci/run", "scripts/system-deps test"),
    ] {
        let text = std::fs::read_to_string(repo().join(script))?;
        assert!(
            text.lines().any(|l| l.trim() == call),
            "{script} does not run `{call}`"
        );
        assert!(
            !text.contains("apt-get install"),
            "{script} installs packages itself; scripts/system-deps is the one place"
        );
    }
    Ok(())
}
