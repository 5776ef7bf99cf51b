use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sandboxd::cli::Cli::parse();
    match sandboxd::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
