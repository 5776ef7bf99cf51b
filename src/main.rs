use clap::Parser;

/// mimalloc instead of glibc malloc: the request path allocates small, short-lived buffers on
/// several threads (tokio workers, SQLite connection workers), where glibc's arenas showed up
/// as ≈ 12% of CPU in profiles (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
