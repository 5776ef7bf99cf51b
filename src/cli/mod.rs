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
    /// Exit 0 when the configured server answers `GET /api/v1/health` (container healthcheck).
    Probe,
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
    /// Chat storage's workspaces: user, quota, bytes used, chats (database read-only).
    Workspaces {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Chat storage's chats: workspace, age, attachments, sandbox phase (database read-only).
    Chats {
        /// Only this workspace's.
        #[arg(long)]
        workspace: Option<String>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let path = app::config_path(cli.config);
    let settings = app::load_settings(path.as_deref())?;
    match cli.command {
        Command::Serve => {
            // Dropped last: flushes exported spans after the server stopped.
            let _telemetry = crate::telemetry::init(&settings.logging, &settings.otel)?;
            let app = Application::build(settings, path.as_deref()).await?;
            app.run_until_stopped(app::shutdown_signal()).await
        }
        Command::Migrate => {
            let _telemetry = crate::telemetry::init(&settings.logging, &settings.otel)?;
            app::open_store(&settings).await?;
            println!(
                "database {} is up to date",
                settings.database.path.display()
            );
            Ok(())
        }
        Command::Probe => probe(&settings).await,
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
        Command::Workspaces { user } => {
            let store = Store::open_read_only(&settings.database.path).await?;
            let storage = crate::storage::ChatStorage::new(&settings.storage.root);
            print!(
                "{}",
                inspect::workspaces(&store, &storage, user.as_deref()).await?
            );
            Ok(())
        }
        Command::Chats { workspace } => {
            let store = Store::open_read_only(&settings.database.path).await?;
            let workspace = workspace
                .as_deref()
                .map(|w| {
                    w.parse()
                        .map_err(|_| anyhow::anyhow!("`{w}` is not a workspace id (a UUID)"))
                })
                .transpose()?;
            print!("{}", inspect::chats(&store, workspace).await?);
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

/// A minimal HTTP/1.0 health request to the configured address, bounded to 3 s.
async fn probe(settings: &crate::config::Settings) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = match settings.http.host.as_str() {
        "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        h => h,
    };
    let addr = if host.contains(':') {
        format!("[{host}]:{}", settings.http.port)
    } else {
        format!("{host}:{}", settings.http.port)
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(b"GET /api/v1/health HTTP/1.0\r\nHost: sandboxd\r\n\r\n")
            .await?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let head = tokio::time::timeout(std::time::Duration::from_secs(3), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no answer within 3 s"))??;
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{addr}: unhealthy: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(())
}
