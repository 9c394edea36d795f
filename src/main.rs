//! The `homicro` binary: parses flags, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use homicro::cli::{self, CliError, RegisterArgs};
use homicro::config::{BrokerUrl, DEFAULT_CONFIG, Overrides, ServeConfig};
use homicro::record::parse_duration_str;
use homicro::topics::Topics;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "homicro",
    version,
    about = "A service registry over MQTT for home and small clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (embedded, or --broker) and the registry.
    Serve(ServeArgs),
    /// Print the default configuration file.
    Config,
    /// Register a service and keep it registered until Ctrl-C.
    Register(RegisterCmd),
    /// Remove a service's record (its own, or any from the server's machine
    /// as an admin).
    Deregister {
        /// The service name whose record goes.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the current records and exit.
    List {
        /// Print a JSON object NAME → record instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a user to a password file (Mosquitto's format), or change its
    /// password: asked for twice, or read from stdin's first line.
    Passwd {
        /// The password file (created when missing).
        file: PathBuf,
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
    /// Forward a local TCP port to an instance of QUERY (a service name or
    /// role@range), picked for each connection from the live directory,
    /// until Ctrl-C.
    Proxy {
        /// A service name, or role@range such as couchdb@3.x.
        query: String,
        /// Where to listen, IP:PORT (port 0: a free one, printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        conn: Conn,
    },
    /// Call one instance of QUERY (a service name or role@range) through
    /// the hub and print its answer's body; exit 1 when the answer's
    /// status is not 2xx (it goes to stderr).
    Call {
        /// A service name, or role@range such as api@^1.2.
        query: String,
        /// The request's body (`-`: read stdin; none: empty).
        body: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print one line per registry change until Ctrl-C.
    Watch {
        /// Print the registry's events as JSON, one per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The one port for everything, IP:PORT: MQTT 3.1.1 and 5, MQTT over
    /// WebSocket (/mqtt) and the HTTP API [default: 0.0.0.0:1883].
    #[arg(long)]
    listen: Option<String>,
    /// Not a flag of serve: the port is part of --listen (refused with a
    /// hint to it).
    #[arg(long, hide = true)]
    port: Option<String>,
    /// Use an existing broker, mqtt://HOST:PORT (mqtts:// for TLS), instead
    /// of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// With --broker: log in to it as this user, with the password in
    /// HOMICRO_PASSWORD.
    #[arg(long, env = "HOMICRO_USERNAME")]
    username: Option<String>,
    /// With an mqtts:// --broker: trust the CAs in this PEM file.
    #[arg(long, env = "HOMICRO_CAFILE")]
    cafile: Option<PathBuf>,
    /// Where records and retained messages are kept, each change synced
    /// before it is acknowledged [default: homicro-state]; '' keeps nothing.
    #[arg(long)]
    state_dir: Option<String>,
    /// A state file of homicro before 0.2, migrated into --state-dir once
    /// (when that is empty) [default: homicro-state.json].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Topic prefix [default: homicro].
    #[arg(long)]
    prefix: Option<String>,
    /// A configuration file (see `homicro config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// error, warn, info, debug or trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Run the embedded broker alone, without the registry (a benchmark
    /// baseline; nothing is enforced).
    #[arg(long)]
    no_registry: bool,
}

/// How a client command reaches the registry.
#[derive(Args)]
struct Conn {
    /// The broker, mqtt://HOST:PORT (mqtts:// for TLS).
    #[arg(long, env = "HOMICRO_BROKER", default_value = "mqtt://localhost:1883", value_parser = parse_broker)]
    broker: BrokerUrl,
    /// Topic prefix.
    #[arg(long, default_value = Topics::DEFAULT_PREFIX, value_parser = parse_prefix)]
    prefix: String,
    /// Connect as this user; the password comes from HOMICRO_PASSWORD
    /// (never from the command line).
    #[arg(long, env = "HOMICRO_USERNAME")]
    username: Option<String>,
    /// With an mqtts:// broker: trust the certificate authorities in this
    /// PEM file instead of the system's.
    #[arg(long, env = "HOMICRO_CAFILE")]
    cafile: Option<PathBuf>,
}

impl Conn {
    /// The broker, with the user to connect as; a command run by a person
    /// gives up at once when nothing listens there.
    fn broker(&self) -> Result<BrokerUrl, CliError> {
        let mut broker = self.broker.clone().with_fail_fast();
        if let Some(ca) = &self.cafile {
            if !broker.tls {
                return Err(CliError {
                    code: 2,
                    message: format!("--cafile needs an mqtts:// broker, not {broker}"),
                });
            }
            broker = broker.with_cafile(ca);
        }
        if broker.tls
            && let Err(e) = broker.tls_config()
        {
            return Err(CliError {
                code: 2,
                message: format!("TLS: {e}"),
            });
        }
        let Some(user) = &self.username else {
            return Ok(broker);
        };
        match std::env::var("HOMICRO_PASSWORD") {
            Ok(password) => Ok(broker.with_login(user, &password)),
            Err(_) => Err(CliError {
                code: 2,
                message: format!("--username {user} needs its password in HOMICRO_PASSWORD"),
            }),
        }
    }
}

#[derive(Args)]
struct RegisterCmd {
    /// The service name: 1-63 of a-z 0-9 . _ -
    name: String,
    /// Its port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Its host [default: this machine's address towards the broker].
    #[arg(long)]
    host: Option<String>,
    /// Expire unless refreshed within this (heartbeats keep it); e.g. 30s.
    /// Without it, the MQTT will clears the record when this process dies.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// What it does, for lookups by role (`role@range` queries, e.g.
    /// api@^1.2) [default: the name].
    #[arg(long)]
    role: Option<String>,
    /// A semver version, e.g. 1.2.0.
    #[arg(long)]
    version: Option<String>,
    /// http, https, mqtt, tcp, ...
    #[arg(long)]
    scheme: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long, value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Health check: a path on host:port (/health) or a full URL.
    #[arg(long)]
    health_http: Option<String>,
    /// Health check: a TCP connect to host:port.
    #[arg(long)]
    health_tcp: bool,
    /// How often the registry runs the health check [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    health_interval: Option<Duration>,
    /// Failed checks in a row that clear the record [default: 3].
    #[arg(long)]
    health_failures: Option<u32>,
    /// Publish once and exit (no heartbeats, no deregistration).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    conn: Conn,
}

fn parse_broker(s: &str) -> Result<BrokerUrl, String> {
    BrokerUrl::parse(s)
}

fn parse_prefix(s: &str) -> Result<String, String> {
    Topics::validate_prefix(s).map(|_| s.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_str(s)
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn init_logging(default: &str) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        // rustls warns of every client that sends an IP address as its
        // server name (mosquitto_sub does): a client's quirk, not ours.
        _ => EnvFilter::new(format!("{default},rustls=error")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Serve(args) => serve(args),
        Command::Passwd { file, user, delete } => match cli::passwd(&file, &user, delete) {
            Ok(()) => ExitCode::SUCCESS,
            Err(CliError { code, message }) => {
                eprintln!("homicro: {message}");
                ExitCode::from(code as u8)
            }
        },
        other => {
            init_logging("warn");
            let rt = runtime();
            match rt.block_on(client(other)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(CliError { code, message }) => {
                    eprintln!("homicro: {message}");
                    ExitCode::from(code as u8)
                }
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn serve(args: ServeArgs) -> ExitCode {
    if let Some(port) = &args.port {
        eprintln!(
            "homicro: serve has no --port: the port is part of --listen IP:PORT, \
             e.g. --listen 0.0.0.0:{port}"
        );
        return ExitCode::from(2);
    }
    let file = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((path.display().to_string(), text)),
            Err(e) => {
                eprintln!("homicro: --config {}: cannot read: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let flags = Overrides {
        listen: args.listen,
        broker: args.broker,
        prefix: args.prefix,
        state_dir: args.state_dir.map(PathBuf::from),
        state_file: args.state_file,
        log_level: args.log_level,
        no_registry: args.no_registry,
    };
    let mut config =
        match ServeConfig::load(file.as_ref().map(|(p, t)| (p.as_str(), t.as_str())), &flags) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("homicro: bad configuration: {e}");
                return ExitCode::from(2);
            }
        };
    if let Some(broker) = config.broker.take() {
        let conn = Conn {
            broker,
            prefix: config.prefix.clone(),
            username: args.username,
            cafile: args.cafile,
        };
        match conn.broker() {
            Ok(b) => config.broker = Some(b),
            Err(CliError { message, .. }) => {
                eprintln!("homicro: --broker: {message}");
                return ExitCode::from(2);
            }
        }
    }
    // Without --broker, --username and --cafile (or their HOMICRO_*
    // variables, set for the CLI) mean nothing: the bus has [auth], [tls].
    init_logging(&config.log_level);
    if config.huge_code_pages {
        // Before the runtime starts its threads (see `hugetext`).
        match homicro::hugetext::remap() {
            Ok(m) => tracing::info!(
                mappings = m.mappings,
                mib = m.bytes >> 20,
                "code and constants on huge pages"
            ),
            Err(e) => tracing::info!(reason = %e, "code left on small pages"),
        }
    }
    let rt = runtime();
    match rt.block_on(homicro::serve::run(config, stop_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ homicro::serve::ServeError::NotWritten(_)) => {
            eprintln!("homicro: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("homicro: {e}");
            ExitCode::from(2)
        }
    }
}

async fn client(cmd: Command) -> Result<(), CliError> {
    match cmd {
        Command::Register(r) => {
            let args = RegisterArgs {
                name: r.name,
                host: r.host,
                port: r.port,
                ttl: r.ttl,
                role: r.role,
                version: r.version,
                scheme: r.scheme,
                meta: r.meta,
                health_http: r.health_http,
                health_tcp: r.health_tcp,
                health_interval: r.health_interval,
                health_failures: r.health_failures,
                once: r.once,
            };
            cli::register(&r.conn.broker()?, &r.conn.prefix, &args, stop_signal()).await
        }
        Command::Deregister { name, conn } => {
            cli::deregister(&conn.broker()?, &conn.prefix, &name).await
        }
        Command::List { json, conn } => cli::list(&conn.broker()?, &conn.prefix, json).await,
        Command::Watch { json, conn } => {
            cli::watch(&conn.broker()?, &conn.prefix, json, stop_signal()).await
        }
        Command::Proxy {
            query,
            listen,
            conn,
        } => cli::proxy(&conn.broker()?, &conn.prefix, listen, &query, stop_signal()).await,
        Command::Call {
            query,
            body,
            timeout,
            conn,
        } => {
            cli::call(
                &conn.broker()?,
                &conn.prefix,
                &query,
                body.as_deref(),
                timeout,
            )
            .await
        }
        Command::Serve(_) | Command::Config | Command::Passwd { .. } => {
            unreachable!("handled in main")
        }
    }
}
