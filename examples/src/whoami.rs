//! What the `whoami` examples share: their command line.

use clap::Args;
use toa_core::{Format, Formats};
use toa_server_shim::{Config, Mode, NoTrustConfigured, ProxyProtocol, TrustPolicy, TrustedSources};

/// The options of `whoami` and `whoami-http`.
#[derive(Args, Debug)]
pub struct Options {
    /// Address to listen on, e.g. `0.0.0.0:8080` or `[::]:8080`.
    #[arg(long)]
    pub listen: String,
    /// A trusted load-balancer source: CIDR, address or `huawei-elb` (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub trust: Vec<TrustedSources>,
    /// Honour a TOA from any source (a client could forge its address).
    #[arg(long, conflicts_with = "trust")]
    pub trust_any: bool,
    /// How to learn the client: auto, saved-syn, ebpf, capture or none.
    #[arg(long, default_value = "auto")]
    pub source: Mode,
    /// TOA formats to accept, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "toa,toa6")]
    pub formats: Vec<Format>,
    /// Read a PROXY protocol header (v1 or v2) from trusted peers: off, optional or required.
    #[arg(long, default_value = "off")]
    pub proxy_protocol: ProxyProtocol,
}

impl Options {
    /// The listener configuration; without one, says why on stderr (as
    /// `program`) and gives the exit code 2.
    pub fn config_or_exit(&self, program: &str) -> Result<Config, std::process::ExitCode> {
        self.config().map_err(|e| {
            eprintln!("{program}: {e}");
            std::process::ExitCode::from(2)
        })
    }

    /// The trust policy, or the reason there is none.
    pub fn policy(&self) -> Result<TrustPolicy, NoTrustConfigured> {
        if self.trust_any {
            Ok(TrustPolicy::any())
        } else {
            TrustPolicy::new(self.trust.iter().cloned().collect())
        }
    }

    /// The listener configuration, or the reason there is none.
    pub fn config(&self) -> Result<Config, NoTrustConfigured> {
        let policy = self.policy()?;
        let formats = self.formats.iter().fold(Formats::NONE, |f, format| f.with(*format));
        Ok(Config::new(policy).formats(formats).mode(self.source).proxy_protocol(self.proxy_protocol))
    }
}
