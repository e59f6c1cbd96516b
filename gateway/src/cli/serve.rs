//! `omnirelay serve` and `omnirelay check-config`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, ConfigError};

/// Loads the configuration (every problem at once), then serves until SIGINT/SIGTERM.
pub(super) async fn serve(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            super::init_tracing(false, None);
            return Err(e.into());
        }
    };
    super::init_tracing(config.log.json, Some(&config.log.filter));
    let problems = config.check_files();
    if !problems.is_empty() {
        anyhow::bail!(
            "{} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    let signals = crate::app::Signals::register()?;
    let running = crate::app::start(&config).await?;
    running.run_until_signal(signals).await?;
    Ok(ExitCode::SUCCESS)
}

/// Prints every problem in the file and the files it names; exit 1 when there is any.
pub(super) fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    let mut problems = match Config::load(path) {
        Ok(config) => config.check_files(),
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => vec![other.to_string()],
    };
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    problems.sort();
    println!("{}: {} problem(s)", path.display(), problems.len());
    for p in problems {
        println!("  - {p}");
    }
    Ok(ExitCode::from(1))
}
