//! The command line: `serve`, `migrate`, `check-config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::{self, Application};

#[derive(Debug, Parser)]
#[command(
    name = "sandboxd",
    version,
    about = "Keeps per-chat agent sandboxes in their declared state"
)]
pub struct Cli {
    /// YAML config file (default: $SANDBOXD_CONFIG, else the embedded defaults).
    #[arg(long, short, global = true, env = "SANDBOXD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API and the controller until SIGTERM/SIGINT.
    Serve,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Validate the config and print the effective values (secrets masked).
    CheckConfig,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let path = app::config_path(cli.config);
    let settings = app::load_settings(path.as_deref())?;
    match cli.command {
        Command::Serve => {
            crate::telemetry::init(&settings.logging);
            let app = Application::build(settings, path.as_deref()).await?;
            app.run_until_stopped(app::shutdown_signal()).await
        }
        Command::Migrate => {
            crate::telemetry::init(&settings.logging);
            app::open_store(&settings).await?;
            println!(
                "database {} is up to date",
                settings.database.path.display()
            );
            Ok(())
        }
        Command::CheckConfig => {
            print!("{}", settings.to_masked_yaml());
            Ok(())
        }
    }
}
