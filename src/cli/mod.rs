//! The command line: `serve`, `migrate`, `check-config`, and the read-only operator views
//! `ls`, `show`, `events`.

mod inspect;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::{self, Application};
use crate::domain::request::parse_chat_id;
use crate::domain::Phase;
use crate::store::Store;

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
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
    /// List sandboxes: phase, age, expiry, endpoint, last error (database read-only).
    Ls {
        /// Only this phase (pending, running, failed, expired, deleting).
        #[arg(long)]
        phase: Option<Phase>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// One sandbox in full, with its recent events (database read-only).
    Show { chat_id: String },
    /// The event log, newest first (database read-only).
    Events {
        /// Only this chat.
        #[arg(long)]
        chat: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
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
        Command::Openapi => {
            println!("{}", crate::http::openapi::document());
            Ok(())
        }
        Command::CheckConfig => {
            print!("{}", settings.to_masked_yaml());
            Ok(())
        }
        Command::Ls { phase, agent } => {
            let store = Store::open_read_only(&settings.database.path).await?;
            print!("{}", inspect::ls(&store, phase, agent).await?);
            Ok(())
        }
        Command::Show { chat_id } => {
            let store = Store::open_read_only(&settings.database.path).await?;
            print!("{}", inspect::show(&store, parse_chat_id(&chat_id)?).await?);
            Ok(())
        }
        Command::Events { chat, limit } => {
            let store = Store::open_read_only(&settings.database.path).await?;
            let chat = chat.as_deref().map(parse_chat_id).transpose()?;
            print!(
                "{}",
                inspect::render_events(&store.events(chat, limit).await?)
            );
            Ok(())
        }
    }
}
