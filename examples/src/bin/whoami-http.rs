//! `whoami-http`: the `whoami` line over HTTP, served by axum through
//! `toa_server_shim::tokio::ToaListener`; handlers get the client through
//! `toa_server_shim::xff::Client`: TOA or PROXY first, then `X-Forwarded-For`
//! when the hop that sent it is a trusted load balancer.
//!
//! ```text
//! whoami-http --listen 0.0.0.0:8080 --trust huawei-elb
//! curl http://backend:8080/   ->   client=203.0.113.7:40000 lb=100.125.0.1:40000 source=saved-syn
//! (through an HTTP load balancer)  client=203.0.113.7:0 lb=100.125.0.1:40000 source=xff
//! ```

use std::process::ExitCode;

use std::sync::Arc;

use axum::routing::get;
use axum::{Extension, Router};
use clap::Parser;
use toa_examples::whoami::Options;
use toa_server_shim::PeerInfo;
use toa_server_shim::tokio::ToaListener;
use toa_server_shim::xff::{Client, XffResolver};

#[derive(Parser)]
#[command(name = "whoami-http", about = "Answer HTTP requests with `client=... lb=... source=...`")]
struct Cli {
    #[command(flatten)]
    options: Options,
}

async fn whoami(Client(peer): Client) -> String {
    format!("{peer}\n")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.options.config_or_exit("whoami-http") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let xff = Arc::new(XffResolver::new(config.policy().clone()));
    let serve = async {
        let listener = ToaListener::bind(&cli.options.listen, config).await?;
        eprintln!("whoami-http: listening on {}", listener.local_addr()?);
        let app = Router::new().route("/", get(whoami)).layer(Extension(xff));
        axum::serve(listener, app.into_make_service_with_connect_info::<PeerInfo>()).await
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .and_then(|runtime| runtime.block_on(serve));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whoami-http: {}: {e}", cli.options.listen);
            ExitCode::FAILURE
        }
    }
}
