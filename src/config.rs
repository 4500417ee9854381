//! Configuration: serde types with their defaults, and `validate()`, which reports every problem at
//! once, each naming its key. The file is parsed once at start-up; nothing else reads TOML.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::auth::Scope;
use crate::sim::SimConfig;
use crate::webhook::egress::{Network, Reach};

/// The whole configuration file. Every table is optional; an empty file is a working gateway
/// with a simulated carrier (see `config/smsgw.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub messages: MessagesConfig,
    pub webhooks: WebhooksConfig,
    pub privacy: PrivacyConfig,
    pub policy: PolicyConfig,
    pub retention: RetentionConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub logging: LoggingConfig,
    pub accounts: Vec<AccountConfig>,
    pub carriers: Vec<CarrierConfig>,
    /// Which carriers take which messages, first matching rule wins; none: every carrier.
    pub routes: Vec<RouteConfig>,
    /// Submissions from a RabbitMQ queue (cargo feature `amqp`).
    pub amqp: crate::intake::AmqpConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the HTTP API listens. Loopback by default: applications are local.
    pub listen: SocketAddr,
    /// Largest request body accepted (a batch of messages is one body).
    pub max_body_bytes: usize,
    /// Most messages in one batch request.
    pub max_batch: usize,
    /// How long a request body may take to arrive.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's header (from its connection or its
    /// previous answer on): a client that trickles it (slowloris) or idles is disconnected.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request header (request line and every header), in bytes; larger → 431.
    pub max_header_bytes: usize,
    /// Most header lines in one request; more → 431.
    pub max_headers: usize,
    /// Most connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Serve the API over TLS (HTTPS) with this certificate and key.
    pub tls: Option<HttpTlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            max_batch: 1000,
            request_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_connections: 1024,
            tls: None,
        }
    }
}

/// The HTTP API's certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// The server's certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite database file. Relative paths are taken from the working directory (under
    /// systemd that is the unit's `StateDirectory`). The default store.
    pub path: PathBuf,
    /// A PostgreSQL database (`postgres://...`) shared by several instances, instead of `path`.
    pub url: Option<String>,
    /// Whether `path` was given (it and `url` exclude each other); not a key.
    #[serde(skip)]
    pub path_given: bool,
    /// Most operations committed in one transaction by the writer (group commit).
    pub max_batch: usize,
    /// PostgreSQL: writer transactions run at once (SQLite has one writer). One by default:
    /// more lowered the accept latency but also the end-to-end rate in the e2e bench (lock
    /// conflicts between the concurrent transactions; see README, Several instances).
    pub writers: usize,
    /// How long a claimed message stays leased to this process before it may be claimed again.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

const DEFAULT_STORE_PATH: &str = "state/smsgw.db";

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from(DEFAULT_STORE_PATH),
            url: None,
            path_given: false,
            max_batch: 1024,
            writers: 1,
            lease: Duration::from_secs(300),
        }
    }
}

/// What to do with a message whose submit_sm was written but never answered (link lost,
/// response timeout): SMPP has no idempotency, so the choice is between a possible duplicate and
/// a possible loss (DOMAIN.md §1.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownOutcome {
    /// Submit again: at-least-once, a duplicate SMS is possible and recorded in the history.
    Resubmit,
    /// Mark the message `unknown` and leave it: at-most-once.
    MarkUnknown,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesConfig {
    /// Validity when a submission gives none; the gateway retries until it ends (`expired`).
    #[serde(with = "humantime_serde")]
    pub default_validity: Duration,
    /// Longest validity a submission may ask for.
    #[serde(with = "humantime_serde")]
    pub max_validity: Duration,
    /// Longest text accepted, in SMS segments.
    pub max_segments: usize,
    /// Delays between attempts after a temporary failure; the last one repeats.
    pub retry_schedule: Schedule,
    pub on_unknown_outcome: UnknownOutcome,
    /// How many messages the dispatcher keeps in flight towards the carriers at most.
    pub max_in_flight: usize,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        MessagesConfig {
            default_validity: Duration::from_secs(48 * 3600),
            max_validity: Duration::from_secs(7 * 24 * 3600),
            max_segments: 10,
            retry_schedule: Schedule::from_secs(&[5, 30, 120, 600, 1800]),
            on_unknown_outcome: UnknownOutcome::Resubmit,
            max_in_flight: 2048,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Delays between delivery attempts; the last one repeats until `give_up_after`.
    pub retry_schedule: Schedule,
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// Most webhook requests in flight at once for one account: an account whose receiver is
    /// slow or dead holds up only its own.
    pub concurrency: usize,
    /// Networks (CIDR, or single addresses) besides public addresses that an account's
    /// `webhook_url` may reach: the operator's own internal receivers. Never a `callback_url`.
    pub allow_internal: Vec<String>,
}

impl WebhooksConfig {
    /// The `allow_internal` networks (validated at load, so none is dropped here).
    pub fn internal_networks(&self) -> Vec<Network> {
        self.allow_internal
            .iter()
            .filter_map(|text| text.parse().ok())
            .collect()
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout: Duration::from_secs(5),
            retry_schedule: Schedule::from_secs(&[1, 5, 30, 120, 600, 3600]),
            give_up_after: Duration::from_secs(3 * 24 * 3600),
            concurrency: 32,
            allow_internal: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Key of the HMAC-SHA256 pseudonym that logs show instead of a phone number.
    pub pseudonym_key: Secret,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            pseudonym_key: Secret(String::new()),
        }
    }
}

/// The operator's policy on number changes and carrier feedback (DESIGN.md, rule 3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How far in the past a reported number change may take effect (the policy gives
    /// customers 48 hours to report).
    #[serde(with = "humantime_serde")]
    pub max_backdate: Duration,
    /// Permanent "unknown subscriber" results that make a number suspect; 0 disables.
    pub suspect_after: u32,
    /// Which results count: submit_sm_resp statuses as `0x..`, receipt `err:` codes as written.
    pub suspect_codes: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            max_backdate: Duration::from_secs(48 * 3600),
            suspect_after: 3,
            // ESME_RINVDSTADR, and GSM MAP error 1 (unknown subscriber) in receipts.
            suspect_codes: vec!["0x0b".into(), "001".into()],
        }
    }
}

/// How long personal data is kept (policy rule 5: deleted data at most one month).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Message and inbound bodies, and webhook payloads, are removed after this many days.
    pub body_days: u32,
    /// Status history (events) is removed after this many days.
    pub event_days: u32,
    /// Canceled messages are removed whole after this many days.
    pub canceled_days: u32,
    /// Idempotency keys are forgotten after this many hours.
    pub idempotency_hours: u32,
    /// How often the purge runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            body_days: 30,
            event_days: 30,
            canceled_days: 30,
            idempotency_hours: 24,
            interval: Duration::from_secs(3600),
        }
    }
}

/// The operators' API (status, queue, carriers), on its own listener: a Unix socket by default,
/// whose file mode decides who may use it, or TCP with a bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Whether to serve it at all.
    pub enabled: bool,
    /// The Unix socket (mode 0600); None: `admin.sock` in the directory of `store.path`, the
    /// gateway's state directory.
    pub socket: Option<PathBuf>,
    /// TCP instead of the socket (needs `token`): for an operator on another host.
    pub listen: Option<SocketAddr>,
    /// The bearer token every admin request must carry; required with `listen`.
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            socket: None,
            listen: None,
            token: None,
        }
    }
}

/// Where the admin API is served, when it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminEndpoint {
    Socket(PathBuf),
    Tcp(SocketAddr),
}

/// Longest admin socket path: the system takes 107 bytes, and the socket is made under a
/// temporary name of up to 12 more bytes beside it (see `api::listener`).
pub const MAX_SOCKET_PATH: usize = 95;

impl Config {
    /// Where the admin API listens (None when disabled): `admin.listen`, else `admin.socket`,
    /// else `admin.sock` beside the SQLite store.
    pub fn admin_endpoint(&self) -> Option<AdminEndpoint> {
        let admin = &self.admin;
        if !admin.enabled {
            return None;
        }
        Some(match (admin.listen, &admin.socket) {
            (Some(address), _) => AdminEndpoint::Tcp(address),
            (None, Some(path)) => AdminEndpoint::Socket(path.clone()),
            (None, None) => AdminEndpoint::Socket(
                self.store
                    .path
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join("admin.sock"),
            ),
        })
    }
}

/// Prometheus's listener: `GET /metrics` only, apart from the API (whose clients, the
/// accounts, must not read each other's counters) and from the admin API (whose token may
/// change things; a scraper only reads).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served; None: nowhere.
    pub listen: Option<SocketAddr>,
    /// A bearer token Prometheus must send (`authorization: {credentials: ...}`); required
    /// when `listen` is not loopback.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,smsgw::smpp=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// An application that may submit messages. Accounts never see each other's messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub name: String,
    /// The account's API keys: `sha256:<hex>` hashes (`smsgw api-key` makes one), each with
    /// every scope, or `{hash, scopes, rate_per_second?, burst?}` tables.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Requests per second the account's keys may make together; unlimited when absent.
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    /// Requests the account may make at once above its rate (default: one second's worth).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Where status changes and inbound replies are posted when a message names no `callback_url`.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Key of the HMAC-SHA256 signature on every webhook of this account.
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
    /// Most events posted in one webhook request. 1 (the default): each request is one event
    /// object. Above 1: each request is a JSON array of up to this many events (to one URL),
    /// which costs the gateway and the receiver far less per event under load.
    #[serde(default = "default_webhook_batch")]
    pub webhook_batch: usize,
    /// Senders this account may use; inbound replies to these are posted to this account.
    #[serde(default)]
    pub senders: Vec<String>,
    /// May send `transactional` (service) messages to opted-out numbers (policy rule 2).
    #[serde(default)]
    pub service_messages: bool,
    /// Messages to a number reported `changed` go to the new number instead of being refused.
    #[serde(default)]
    pub follow_number_changes: bool,
    /// Consent time assumed when a message gives no `consent_at` (RFC 3339). Without it, any
    /// number change refuses a message that gives no consent time.
    #[serde(default)]
    pub default_consent_at: Option<String>,
    /// Reply keywords (STOP, START, HELP ...) and the texts answered to them.
    #[serde(default)]
    pub keywords: crate::policy::opt_out::Keywords,
}

/// One API key of an account: the hash of the key, what it may do, and its own rate limit.
/// Written either as the plain hash (every scope, no limit of its own) or as a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyConfig {
    pub hash: String,
    pub scopes: Vec<Scope>,
    pub rate_per_second: Option<u32>,
    pub burst: Option<u32>,
}

impl ApiKeyConfig {
    /// The plain form: a key hash with every scope.
    pub fn all_scopes(hash: &str) -> ApiKeyConfig {
        ApiKeyConfig {
            hash: hash.to_owned(),
            scopes: Scope::ALL.to_vec(),
            rate_per_second: None,
            burst: None,
        }
    }
}

/// The table form of [`ApiKeyConfig`]; `scopes` must be given.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopedKey {
    hash: String,
    scopes: Vec<Scope>,
    #[serde(default)]
    rate_per_second: Option<u32>,
    #[serde(default)]
    burst: Option<u32>,
}

impl<'de> Deserialize<'de> for ApiKeyConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = ApiKeyConfig;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a key hash \"sha256:...\" or a table {hash = \"sha256:...\", scopes = [...]}",
                )
            }

            fn visit_str<E: serde::de::Error>(self, hash: &str) -> Result<ApiKeyConfig, E> {
                Ok(ApiKeyConfig::all_scopes(hash))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ApiKeyConfig, A::Error> {
                let key =
                    ScopedKey::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ApiKeyConfig {
                    hash: key.hash,
                    scopes: key.scopes,
                    rate_per_second: key.rate_per_second,
                    burst: key.burst,
                })
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

/// One carrier SMSC. Either `address` (a real SMSC) or `simulator` (an SMSC simulated inside
/// this process, for trying the gateway without a carrier account) is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarrierConfig {
    pub name: String,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub simulator: Option<SimConfig>,
    #[serde(default = "default_system_id")]
    pub system_id: String,
    #[serde(default = "default_password")]
    pub password: Secret,
    #[serde(default)]
    pub system_type: String,
    /// Number of transceiver binds to keep open.
    #[serde(default = "default_binds")]
    pub binds: usize,
    /// Most submit_sm awaiting their response on one bind.
    #[serde(default = "default_window")]
    pub window: usize,
    /// submit_sm per second on one bind, counted in segments.
    #[serde(default = "default_rate")]
    pub rate_per_second: u32,
    #[serde(default = "default_enquire_link", with = "humantime_serde")]
    pub enquire_link_interval: Duration,
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long a draining bind waits for its window to empty at shutdown.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Refusals after which a message goes to the next carrier of its route at once, instead of
    /// waiting for a retry here: status classes (`temporary`, `throttled`, `permanent`,
    /// `session`) or codes (`0x58`). A carrier without a bound link is always skipped.
    #[serde(default)]
    pub failover_on: Vec<String>,
    /// Whether submit_sm carries the message's remaining validity, so that the carrier stops
    /// trying when the gateway would (SMPP time format, DOMAIN.md §2.4).
    #[serde(default)]
    pub validity_period: ValidityPeriod,
    /// How this carrier's receipts write the id its submit_sm_resp gave (DOMAIN.md §3.5).
    #[serde(default)]
    pub receipt_id: ReceiptIdRule,
    /// How a long message goes out: UDH, SAR TLVs, or one message_payload.
    #[serde(default)]
    pub multipart: Multipart,
    /// Ask with query_sm about a message still `sent` this long after it was accepted
    /// (no final receipt). Off when unset.
    #[serde(default, with = "humantime_serde")]
    pub query_after: Option<Duration>,
    /// How long a receipt that matches no message waits for its submit_sm_resp before it is
    /// given up and listed as unmatched.
    #[serde(default = "default_unmatched_after", with = "humantime_serde")]
    pub unmatched_after: Duration,
    /// No PDU at all from the SMSC for this long: the link is dropped and bound again.
    #[serde(default = "default_inactivity_timeout", with = "humantime_serde")]
    pub inactivity_timeout: Duration,
    /// SMPP version to bind with: "3.4" (default) or "5.0".
    #[serde(default)]
    pub interface_version: SmppVersion,
    /// One transceiver per bind slot, or a transmitter + receiver pair.
    #[serde(default)]
    pub bind_type: BindType,
    /// TLS towards the SMSC; absent means plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Segments the carrier takes per minute, hour and day (UTC clock windows); a used-up quota
    /// holds messages in the queue until its window ends.
    #[serde(default)]
    pub quota_per_minute: Option<u64>,
    #[serde(default)]
    pub quota_per_hour: Option<u64>,
    #[serde(default)]
    pub quota_per_day: Option<u64>,
}

/// How a carrier is told a message's validity in `validity_period` of submit_sm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidityPeriod {
    /// Left empty: the carrier's default validity applies.
    #[default]
    None,
    /// `000000020000000R`: the time left, counted from when the carrier receives it.
    Relative,
    /// `260301143000000+`: the moment it ends, in UTC.
    Absolute,
}

/// One routing rule: the messages it takes (every condition given must hold; none given takes
/// every message) and the carriers that send them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown by `smsgw route` and in message histories; `routes[i]` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Destination prefixes in E.164 (`+4670`); any one matches.
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub category: Option<crate::message::Category>,
    /// The one carrier of the rule...
    #[serde(default)]
    pub carrier: Option<String>,
    /// ...or a set sharing its messages by weight; the others of the set take over when the
    /// chosen one cannot.
    #[serde(default)]
    pub carriers: Vec<WeightedCarrier>,
    /// Tried in this order after the rule's carrier(s).
    #[serde(default)]
    pub failover: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCarrier {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// How a carrier's receipts write a message id, compared with its submit_sm_resp.
/// Ids are always compared trimmed, upper-cased and without leading zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptIdRule {
    /// The same way as the response.
    #[default]
    AsIs,
    /// In hexadecimal, the number the response gave in decimal.
    Hex,
    /// In decimal, the number the response gave in hexadecimal.
    Decimal,
    /// Learned from the first receipts: each is tried as given, as hex and as decimal.
    Auto,
}

/// How a message longer than one SMS is submitted (DOMAIN.md §2.5, §4.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Multipart {
    /// One submit_sm per part, each starting with a concatenation header (esm_class 0x40).
    #[default]
    Udh,
    /// One submit_sm per part with sar_msg_ref_num, sar_total_segments, sar_segment_seqnum;
    /// the carrier builds the header.
    Sar,
    /// One submit_sm with the whole text in the message_payload TLV; the carrier splits it.
    Payload,
}

/// The SMPP version a carrier binds with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SmppVersion {
    #[default]
    #[serde(rename = "3.4")]
    V34,
    #[serde(rename = "5.0")]
    V50,
}

/// How a bind slot connects: one transceiver, or a transmitter for submits and a receiver for
/// receipts and inbound SMS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindType {
    #[default]
    Transceiver,
    Pair,
}

/// TLS towards one carrier (rustls).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificates to trust; absent means the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name the SMSC's certificate must carry; absent means the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM certificate chain and private key, when the carrier wants a client certificate.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_system_id() -> String {
    "smsgw".into()
}
fn default_password() -> Secret {
    Secret("secret".into())
}
fn default_binds() -> usize {
    1
}
fn default_window() -> usize {
    10
}
fn default_rate() -> u32 {
    100
}
fn default_enquire_link() -> Duration {
    Duration::from_secs(30)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_min() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(60)
}
fn default_webhook_batch() -> usize {
    1
}
/// Most events in one webhook request (`accounts.webhook_batch`): a request stays well under
/// a receiver's usual body limits (an event is ~250 bytes).
pub const MAX_WEBHOOK_BATCH: usize = 500;
fn default_drain_timeout() -> Duration {
    Duration::from_secs(5)
}
/// Longest `unmatched_after`: the store drops parked receipts unseen an hour after it
/// (`EARLY_RECEIPT_TTL_MS`).
pub const MAX_UNMATCHED_AFTER: Duration = Duration::from_secs(24 * 3600);
fn default_unmatched_after() -> Duration {
    MAX_UNMATCHED_AFTER
}
fn default_inactivity_timeout() -> Duration {
    Duration::from_secs(300)
}

/// A rate limit: `rate_per_second` at least 1 when set, `burst` only with it.
fn validate_rate(key: &str, rate: Option<u32>, burst: Option<u32>, problems: &mut Vec<String>) {
    if rate == Some(0) {
        problems.push(format!(
            "{key}.rate_per_second: must be at least 1 (leave it out for no limit)"
        ));
    }
    match (rate, burst) {
        (_, Some(0)) => problems.push(format!("{key}.burst: must be at least 1")),
        (None, Some(_)) => problems.push(format!("{key}.burst: needs rate_per_second beside it")),
        _ => {}
    }
}

/// Delays between attempts, written `["5s", "30s", "2m"]`; the last delay repeats.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "Vec<humantime_serde::Serde<Duration>>")]
pub struct Schedule(pub Vec<Duration>);

impl Schedule {
    pub fn from_secs(secs: &[u64]) -> Schedule {
        Schedule(secs.iter().copied().map(Duration::from_secs).collect())
    }

    /// The delay before attempt `attempt + 1`, after `attempt` failed ones (counted from 1).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let index = (attempt.max(1) as usize - 1).min(self.0.len().saturating_sub(1));
        self.0
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(60))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<humantime_serde::Serde<Duration>>> for Schedule {
    fn from(delays: Vec<humantime_serde::Serde<Duration>>) -> Schedule {
        Schedule(delays.into_iter().map(|d| d.into_inner()).collect())
    }
}

/// A value never shown in `Debug` output or logs.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why the configuration was refused: every problem found, each naming its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: invalid configuration:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// A TOML error for people, without the source text: toml's own message quotes the faulty line,
/// and that line may hold a secret (`password = "hunter2` unterminated). This gives the line,
/// the column, the key where known, and the parser's message; on a line that may hold a secret
/// (it names a password, secret, pseudonym key or URL, or the error has no position) the values
/// the message quotes (serde's "invalid type: integer `123`") are left out as well.
pub fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let mut bare = error.clone();
    bare.set_input(None);
    // Without the input, toml writes the message, then "in `key.path`" when it knows the key.
    let shown = bare.to_string();
    let key = shown
        .trim_end()
        .rsplit_once("\nin `")
        .and_then(|(_, key)| key.strip_suffix('`'))
        .map(|key| format!(" (key `{key}`)"))
        .unwrap_or_default();
    let at = error.span().map(|span| {
        let mut start = span.start.min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let before = &text[..start];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        let line_end = text[line_start..]
            .find('\n')
            .map_or(text.len(), |i| line_start + i);
        (line, column, &text[line_start..line_end])
    });
    // The keys that hold secrets (`Secret` values), and URLs, which may carry credentials
    // (`store.url`) or tokens. API keys are configured as hashes: not secret.
    let secret_words = ["password", "secret", "pseudonym_key", "url"];
    let sensitive = at.is_none_or(|(_, _, line)| {
        let line = line.to_ascii_lowercase();
        secret_words.iter().any(|word| line.contains(word))
    });
    let message = if sensitive {
        without_quotes(error.message())
    } else {
        error.message().to_owned()
    };
    match at {
        Some((line, column, _)) => {
            format!("TOML error at line {line}, column {column}{key}: {message}")
        }
        None => format!("TOML error{key}: {message}"),
    }
}

/// `text` with every `...` and "..." span replaced by `…`.
fn without_quotes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quote = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '`' || c == '"' => {
                quote = Some(c);
                out.push('…');
            }
            None => out.push(c),
        }
    }
    out
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: toml_error(text, &e),
        })?;
        config.store.path_given = text
            .parse::<toml::Table>()
            .is_ok_and(|t| t.get("store").and_then(|s| s.get("path")).is_some());
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Every problem in the configuration, each starting with the key it concerns.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, key: &str, why: &str| {
            if !ok {
                problems.push(format!("{key}: {why}"));
            }
        };
        need(
            self.http.max_body_bytes >= 1024,
            "http.max_body_bytes",
            "must be at least 1024",
        );
        need(
            self.http.max_batch >= 1,
            "http.max_batch",
            "must be at least 1",
        );
        need(
            !self.http.request_timeout.is_zero(),
            "http.request_timeout",
            "must be above zero",
        );
        need(
            !self.http.header_read_timeout.is_zero(),
            "http.header_read_timeout",
            "must be above zero",
        );
        // hyper reads a header into a buffer of at least 8 KiB.
        need(
            (8192..=1024 * 1024).contains(&self.http.max_header_bytes),
            "http.max_header_bytes",
            "must be between 8192 and 1048576",
        );
        need(
            (8..=1000).contains(&self.http.max_headers),
            "http.max_headers",
            "must be between 8 and 1000",
        );
        need(
            self.http.max_connections >= 1,
            "http.max_connections",
            "must be at least 1",
        );
        need(
            self.store.max_batch >= 1,
            "store.max_batch",
            "must be at least 1",
        );
        need(
            (1..=256).contains(&self.store.writers),
            "store.writers",
            "must be between 1 and 256",
        );
        need(
            self.store.lease >= Duration::from_secs(10),
            "store.lease",
            "must be at least 10s",
        );
        need(
            !(self.store.url.is_some() && self.store.path_given),
            "store.url",
            "give either store.url (PostgreSQL) or store.path (SQLite), not both",
        );
        need(
            self.store.url.as_deref().is_none_or(|url| {
                url.starts_with("postgres://") || url.starts_with("postgresql://")
            }),
            "store.url",
            "must be a PostgreSQL URL: postgres://user@host:port/database",
        );
        let m = &self.messages;
        need(
            (1..=255).contains(&m.max_segments),
            "messages.max_segments",
            "must be between 1 and 255",
        );
        need(
            !m.default_validity.is_zero() && m.default_validity <= m.max_validity,
            "messages.default_validity",
            "must be above zero and at most messages.max_validity",
        );
        need(
            !m.retry_schedule.is_empty(),
            "messages.retry_schedule",
            "must list at least one delay",
        );
        need(
            m.max_in_flight >= 1,
            "messages.max_in_flight",
            "must be at least 1",
        );
        need(
            !self.webhooks.retry_schedule.is_empty(),
            "webhooks.retry_schedule",
            "must list at least one delay",
        );
        need(
            self.webhooks.concurrency >= 1,
            "webhooks.concurrency",
            "must be at least 1",
        );
        let r = &self.retention;
        need(
            (1..=30).contains(&r.body_days),
            "retention.body_days",
            "must be between 1 and 30 (the policy keeps personal data at most one month)",
        );
        need(
            (1..=30).contains(&r.canceled_days),
            "retention.canceled_days",
            "must be between 1 and 30 (deleted data is kept at most one month)",
        );
        need(
            (1..=30).contains(&r.event_days),
            "retention.event_days",
            "must be between 1 and 30 (history can name numbers; personal data is kept at most one month)",
        );
        need(
            r.idempotency_hours >= 1,
            "retention.idempotency_hours",
            "must be at least 1",
        );
        need(
            r.interval >= Duration::from_secs(1),
            "retention.interval",
            "must be at least 1s",
        );
        need(
            self.privacy.pseudonym_key.expose().len() >= 16,
            "privacy.pseudonym_key",
            "must be set to a secret of at least 16 characters",
        );
        for (i, text) in self.webhooks.allow_internal.iter().enumerate() {
            if let Err(e) = text.parse::<Network>() {
                problems.push(format!("webhooks.allow_internal[{i}]: {e}"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            problems.push(format!(
                "logging.level: `{}` is not a valid filter",
                self.logging.level
            ));
        }
        if let Some(tls) = &self.http.tls
            && let Err(problem) = crate::api::serve::load_tls(tls)
        {
            problems.push(problem.to_string());
        }
        self.validate_accounts(&mut problems);
        self.validate_carriers(&mut problems);
        self.validate_routes(&mut problems);
        self.validate_operators(&mut problems);
        problems.extend(self.amqp.validate(&self.accounts));
        problems
    }

    /// The admin and metrics listeners: who can reach them decides whether a token is needed.
    fn validate_operators(&self, problems: &mut Vec<String>) {
        let admin = &self.admin;
        if admin.listen.is_some() && admin.socket.is_some() {
            problems.push(
                "admin.listen: give either admin.socket (a Unix socket) or admin.listen (TCP), \
                 not both"
                    .into(),
            );
        }
        // Any TCP listener, loopback too: every local user, a browser on this host and the
        // gateway's own webhook requests reach loopback; only the socket has file permissions.
        if admin.enabled && admin.listen.is_some() && admin.token.is_none() {
            problems.push(
                "admin.listen: a TCP admin listener (loopback included) needs admin.token, a \
                 random secret of at least 16 characters; or remove admin.listen to use the Unix \
                 socket"
                    .into(),
            );
        }
        if let Some(AdminEndpoint::Socket(path)) = self.admin_endpoint()
            && path.as_os_str().len() > MAX_SOCKET_PATH
        {
            problems.push(format!(
                "admin.socket: `{}` is longer than {MAX_SOCKET_PATH} bytes, too long for a Unix \
                 socket{}",
                path.display(),
                if admin.socket.is_none() {
                    " (by default it is admin.sock beside store.path)"
                } else {
                    ""
                }
            ));
        }
        if let Some(address) = self.metrics.listen
            && !address.ip().is_loopback()
            && self.metrics.token.is_none()
        {
            problems.push(format!(
                "metrics.listen: {address} is not loopback: set metrics.token (Prometheus sends \
                 it as a bearer token), or listen on 127.0.0.1"
            ));
        }
        for (key, token) in [
            ("admin.token", &admin.token),
            ("metrics.token", &self.metrics.token),
        ] {
            if let Some(token) = token
                && token.expose().len() < 16
            {
                problems.push(format!("{key}: must be at least 16 characters"));
            }
        }
    }

    fn validate_accounts(&self, problems: &mut Vec<String>) {
        let reach = Reach::with_internal(self.webhooks.internal_networks());
        let mut names = std::collections::HashSet::new();
        let mut senders = std::collections::HashSet::new();
        for (i, account) in self.accounts.iter().enumerate() {
            let key = format!("accounts[{i}]");
            if account.name.is_empty() || !names.insert(account.name.as_str()) {
                problems.push(format!("{key}.name: must be set and unique"));
            }
            for (j, sender) in account.senders.iter().enumerate() {
                if !senders.insert(sender.trim_start_matches('+')) {
                    problems.push(format!(
                        "{key}.senders[{j}]: `{sender}` belongs to another account already (inbound replies need one owner)"
                    ));
                }
            }
            if account.api_keys.is_empty() {
                problems.push(format!("{key}.api_keys: needs at least one key hash"));
            }
            validate_rate(&key, account.rate_per_second, account.burst, problems);
            for (j, api_key) in account.api_keys.iter().enumerate() {
                let key = format!("{key}.api_keys[{j}]");
                if crate::api::auth::parse_key_hash(&api_key.hash).is_none() {
                    problems.push(format!(
                        "{key}: must be `sha256:` and 64 hex digits (see `smsgw api-key`)"
                    ));
                }
                if api_key.scopes.is_empty() {
                    problems.push(format!(
                        "{key}.scopes: must list at least one of {}",
                        Scope::names()
                    ));
                }
                validate_rate(&key, api_key.rate_per_second, api_key.burst, problems);
            }
            if let Some(t) = &account.default_consent_at
                && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .is_err()
            {
                problems.push(format!(
                    "{key}.default_consent_at: must be an RFC 3339 time such as 2026-01-01T00:00:00Z"
                ));
            }
            problems.extend(
                account
                    .keywords
                    .validate()
                    .into_iter()
                    .map(|p| format!("{key}.keywords.{p}")),
            );
            if !(1..=MAX_WEBHOOK_BATCH).contains(&account.webhook_batch) {
                problems.push(format!(
                    "{key}.webhook_batch: must be from 1 to {MAX_WEBHOOK_BATCH} (events per request)"
                ));
            }
            if let Some(url) = &account.webhook_url {
                match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {
                        // A name is judged when posted, on what it resolves to then.
                        if let Err(refused) = reach.check_url(&u) {
                            problems.push(format!(
                                "{key}.webhook_url: {refused}; list it in webhooks.allow_internal to post to it"
                            ));
                        }
                    }
                    _ => problems.push(format!("{key}.webhook_url: must be an http or https URL")),
                }
                if account.webhook_secret.is_none() {
                    problems.push(format!(
                        "{key}.webhook_secret: must be set when webhook_url is (webhooks are always signed)"
                    ));
                }
            }
        }
    }

    fn validate_carriers(&self, problems: &mut Vec<String>) {
        if self.carriers.is_empty() {
            problems.push("carriers: at least one carrier is needed".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.carriers.iter().enumerate() {
            let key = format!("carriers[{i}]");
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                problems.push(format!("{key}.name: must be set and unique"));
            }
            match (&c.address, &c.simulator) {
                (Some(_), Some(_)) | (None, None) => problems.push(format!(
                    "{key}: set exactly one of `address` (a real SMSC) or `simulator`"
                )),
                (Some(address), None) if !address.contains(':') => {
                    problems.push(format!("{key}.address: must be host:port"))
                }
                (None, Some(sim)) => problems.extend(
                    sim.validate()
                        .into_iter()
                        .map(|p| format!("{key}.simulator.{p}")),
                ),
                _ => {}
            }
            if c.system_id.is_empty() || c.system_id.len() > 15 {
                problems.push(format!("{key}.system_id: must be 1 to 15 characters"));
            }
            if c.password.expose().len() > 8 {
                problems.push(format!("{key}.password: SMPP allows at most 8 characters"));
            }
            if c.system_type.len() > 12 {
                problems.push(format!(
                    "{key}.system_type: SMPP allows at most 12 characters"
                ));
            }
            if c.binds == 0 || c.binds > 64 {
                problems.push(format!("{key}.binds: must be between 1 and 64"));
            }
            if c.window == 0 || c.window > 1000 {
                problems.push(format!("{key}.window: must be between 1 and 1000"));
            }
            if c.rate_per_second == 0 {
                problems.push(format!("{key}.rate_per_second: must be at least 1"));
            }
            if c.reconnect_min.is_zero() || c.reconnect_min > c.reconnect_max {
                problems.push(format!(
                    "{key}.reconnect_min: must be above zero and at most reconnect_max"
                ));
            }
            if c.response_timeout.is_zero() {
                problems.push(format!("{key}.response_timeout: must be above zero"));
            }
            if c.query_after.is_some_and(|d| d < Duration::from_secs(1)) {
                problems.push(format!(
                    "{key}.query_after: must be at least 1s (or left out to never query)"
                ));
            }
            if c.unmatched_after < Duration::from_secs(1) || c.unmatched_after > MAX_UNMATCHED_AFTER
            {
                problems.push(format!("{key}.unmatched_after: must be between 1s and 24h"));
            }
            if c.inactivity_timeout <= c.enquire_link_interval {
                problems.push(format!(
                    "{key}.inactivity_timeout: must be longer than enquire_link_interval (each enquire_link proves the link alive)"
                ));
            }
            for (name, quota) in [
                ("quota_per_minute", c.quota_per_minute),
                ("quota_per_hour", c.quota_per_hour),
                ("quota_per_day", c.quota_per_day),
            ] {
                if quota == Some(0) {
                    problems.push(format!("{key}.{name}: must be at least 1 when set"));
                }
            }
            match (&c.tls, &c.address) {
                (Some(tls), Some(address)) => problems.extend(
                    crate::smpp::tls::check(tls, address)
                        .into_iter()
                        .map(|p| format!("{key}.tls.{p}")),
                ),
                (Some(_), None) => problems.push(format!(
                    "{key}.tls: only for a carrier with an `address` (the built-in simulator speaks plain TCP)"
                )),
                _ => {}
            }
            for (j, trigger) in c.failover_on.iter().enumerate() {
                if crate::router::FailoverTrigger::parse(trigger).is_none() {
                    problems.push(format!(
                        "{key}.failover_on[{j}]: `{trigger}` is neither a status class (temporary, throttled, permanent, session) nor a code such as 0x58"
                    ));
                }
            }
        }
    }

    fn validate_routes(&self, problems: &mut Vec<String>) {
        let carriers: std::collections::HashSet<&str> =
            self.carriers.iter().map(|c| c.name.as_str()).collect();
        let accounts: std::collections::HashSet<&str> =
            self.accounts.iter().map(|a| a.name.as_str()).collect();
        let mut catch_all: Option<usize> = None;
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if let Some(first) = catch_all {
                problems.push(format!(
                    "{key}: never used: routes[{first}] before it takes every message (put the default route last)"
                ));
            }
            for (j, prefix) in route.prefixes.iter().enumerate() {
                let digits = prefix.strip_prefix('+').unwrap_or(prefix);
                if !prefix.starts_with('+')
                    || digits.is_empty()
                    || digits.len() > 15
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    problems.push(format!(
                        "{key}.prefixes[{j}]: `{prefix}` must be `+` and 1 to 15 digits of an E.164 number, such as +4670"
                    ));
                }
            }
            if let Some(account) = &route.account
                && !accounts.contains(account.as_str())
            {
                problems.push(format!("{key}.account: no account named `{account}`"));
            }
            let mut named: Vec<(String, &str)> = Vec::new();
            match (&route.carrier, route.carriers.is_empty()) {
                (Some(_), false) => {
                    problems.push(format!("{key}: set `carrier` or `carriers`, not both"))
                }
                (None, true) => problems.push(format!(
                    "{key}.carriers: must name at least one carrier (or set `carrier`)"
                )),
                (Some(name), true) => named.push((format!("{key}.carrier"), name)),
                (None, false) => {
                    for (j, c) in route.carriers.iter().enumerate() {
                        if c.weight == 0 {
                            problems.push(format!(
                                "{key}.carriers[{j}].weight: must be at least 1 (list a standby carrier under `failover`)"
                            ));
                        }
                        named.push((format!("{key}.carriers[{j}].name"), &c.name));
                    }
                }
            }
            for (j, name) in route.failover.iter().enumerate() {
                named.push((format!("{key}.failover[{j}]"), name));
            }
            let mut seen = std::collections::HashSet::new();
            for (name_key, name) in named {
                if !carriers.contains(name) {
                    problems.push(format!("{name_key}: no carrier named `{name}`"));
                } else if !seen.insert(name) {
                    problems.push(format!("{name_key}: `{name}` is named twice in this route"));
                }
            }
            let unconditional = route.prefixes.is_empty()
                && route.sender.is_none()
                && route.account.is_none()
                && route.category.is_none();
            if unconditional && catch_all.is_none() {
                catch_all = Some(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
        [privacy]
        pseudonym_key = "0123456789abcdef0123"
        [[carriers]]
        name = "sim"
        simulator = {}
    "#;

    #[test]
    fn the_shipped_config_is_valid() {
        let text = include_str!("../config/smsgw.toml");
        let config = parse(text).expect("config/smsgw.toml must be valid");
        assert_eq!(config.carriers[0].name, "simulated");
        assert!(config.carriers[0].simulator.is_some());
    }

    #[test]
    fn the_store_is_either_a_file_or_a_postgres_url() {
        let url = "[store]\nurl = \"postgres://postgres@127.0.0.1/smsgw\"\n";
        let config = parse(&format!("{MINIMAL}\n{url}")).unwrap();
        assert_eq!(
            config.store.url.as_deref(),
            Some("postgres://postgres@127.0.0.1/smsgw")
        );
        let both = format!("{MINIMAL}\n{url}path = \"x.db\"\n");
        let err = parse(&both).unwrap_err().to_string();
        assert!(err.contains("store.url: give either"), "{err}");
        let mysql = format!("{MINIMAL}\n[store]\nurl = \"mysql://x\"\n");
        let err = parse(&mysql).unwrap_err().to_string();
        assert!(err.contains("store.url: must be a PostgreSQL URL"), "{err}");
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.http.listen.port(), 8080);
        assert_eq!(config.carriers[0].window, 10);
        assert_eq!(config.messages.on_unknown_outcome, UnknownOutcome::Resubmit);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = parse(&format!("{MINIMAL}\n[http]\nlisten_port = 1\n")).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let text = r#"
            [messages]
            max_segments = 0
            [[carriers]]
            name = "a"
            address = "nowhere"
            window = 0
        "#;
        let err = parse(text).unwrap_err().to_string();
        for key in [
            "messages.max_segments",
            "privacy.pseudonym_key",
            "carriers[0].address",
            "carriers[0].window",
        ] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
    }

    #[test]
    fn bad_durations_name_the_key() {
        let err = parse(&format!("{MINIMAL}\n[store]\nlease = \"soon\"\n")).unwrap_err();
        assert!(err.to_string().contains("lease"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_from_debug_output() {
        let config = parse(MINIMAL).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("0123456789abcdef0123"));
        assert!(!shown.contains("\"secret\""));
    }

    #[test]
    fn routes_are_checked_and_each_problem_names_its_key() {
        let text = format!(
            r#"{MINIMAL}
            [[carriers]]
            name = "spare"
            address = "h:1"
            failover_on = ["throttled", "0x45", "sometimes"]
            [[routes]]
            prefixes = ["46", "+46x"]
            carrier = "nobody"
            [[routes]]
            carriers = [{{ name = "sim", weight = 0 }}, {{ name = "sim" }}]
            [[routes]]
            account = "ghost"
            carriers = []
            [[routes]]
            carrier = "sim"
            carriers = [{{ name = "spare" }}]
            failover = ["missing"]
            [[routes]]
            carrier = "sim"
            [[routes]]
            carrier = "spare"
            "#
        );
        let err = parse(&text).unwrap_err().to_string();
        for key in [
            "carriers[1].failover_on[2]: `sometimes`",
            "routes[0].prefixes[0]: `46`",
            "routes[0].prefixes[1]: `+46x`",
            "routes[0].carrier: no carrier named `nobody`",
            "routes[1].carriers[0].weight: must be at least 1",
            "routes[1].carriers[1].name: `sim` is named twice",
            "routes[2].account: no account named `ghost`",
            "routes[2].carriers: must name at least one carrier",
            "routes[3]: set `carrier` or `carriers`, not both",
            "routes[3].failover[0]: no carrier named `missing`",
            "routes[5]: never used: routes[1] before it takes every message",
        ] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
        assert!(!err.contains("failover_on[0]"), "{err}");
    }

    #[test]
    fn a_route_set_with_weights_parses() {
        let text = format!(
            r#"{MINIMAL}
            [[carriers]]
            name = "spare"
            address = "h:1"
            validity_period = "relative"
            [[routes]]
            name = "nordics"
            prefixes = ["+46", "+47"]
            category = "marketing"
            carriers = [{{ name = "sim", weight = 3 }}, {{ name = "spare" }}]
            [[routes]]
            carrier = "spare"
            failover = ["sim"]
            "#
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.routes.len(), 2);
        assert_eq!(
            config.routes[0].carriers[1].weight, 1,
            "weight defaults to 1"
        );
        assert_eq!(config.carriers[1].validity_period, ValidityPeriod::Relative);
        assert_eq!(config.carriers[0].validity_period, ValidityPeriod::None);
    }

    #[test]
    fn receipt_keys_are_checked_by_name() {
        let config = parse(MINIMAL).unwrap();
        let carrier = &config.carriers[0];
        assert_eq!(carrier.receipt_id, ReceiptIdRule::AsIs);
        assert_eq!(carrier.multipart, Multipart::Udh);
        assert_eq!(carrier.query_after, None);
        assert_eq!(carrier.unmatched_after, MAX_UNMATCHED_AFTER);

        let text = format!(
            "{MINIMAL}receipt_id = \"auto\"\nmultipart = \"payload\"\nquery_after = \"1h\"\n"
        );
        let carrier = parse(&text).unwrap().carriers.remove(0);
        assert_eq!(carrier.receipt_id, ReceiptIdRule::Auto);
        assert_eq!(carrier.multipart, Multipart::Payload);
        assert_eq!(carrier.query_after, Some(Duration::from_secs(3600)));

        let text = format!("{MINIMAL}query_after = \"10ms\"\nunmatched_after = \"2d\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("carriers[0].query_after"), "{err}");
        assert!(err.contains("carriers[0].unmatched_after"), "{err}");

        let err = parse(&format!("{MINIMAL}receipt_id = \"octal\"\n")).unwrap_err();
        assert!(err.to_string().contains("receipt_id"), "{err}");
    }

    #[test]
    fn link_keys_are_checked_by_name() {
        let text = r#"
            [privacy]
            pseudonym_key = "0123456789abcdef0123"
            [[carriers]]
            name = "a"
            address = "smsc.example.net:3550"
            enquire_link_interval = "30s"
            inactivity_timeout = "10s"
            quota_per_hour = 0
            tls = { ca_file = "/nonexistent/ca.pem" }
            [[carriers]]
            name = "b"
            simulator = {}
            tls = {}
        "#;
        let err = parse(text).unwrap_err().to_string();
        for key in [
            "carriers[0].inactivity_timeout",
            "carriers[0].quota_per_hour",
            "carriers[0].tls.ca_file",
            "carriers[1].tls",
        ] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
        let bad_version = format!("{MINIMAL}interface_version = \"4.0\"\n");
        let err = parse(&bad_version).unwrap_err().to_string();
        assert!(err.contains("interface_version"), "{err}");
        let good = format!("{MINIMAL}interface_version = \"5.0\"\nbind_type = \"pair\"\n");
        let config = parse(&good).unwrap();
        assert_eq!(config.carriers[0].interface_version, SmppVersion::V50);
        assert_eq!(config.carriers[0].bind_type, BindType::Pair);
        assert_eq!(
            config.carriers[0].inactivity_timeout,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn api_key_hashes_are_checked() {
        let text = format!("{MINIMAL}\n[[accounts]]\nname = \"a\"\napi_keys = [\"plain-key\"]\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("accounts[0].api_keys[0]"), "{err}");
    }

    const HASH: &str = "sha256:c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c";

    #[test]
    fn a_key_is_a_plain_hash_with_every_scope_or_a_table_with_its_scopes() {
        let text = format!(
            "{MINIMAL}\n[[accounts]]\nname = \"a\"\nrate_per_second = 10\n\
             api_keys = [\"{HASH}\", {{ hash = \"{HASH}\", scopes = [\"submit\", \"read\"], \
             rate_per_second = 2, burst = 5 }}]\n"
        );
        let config = parse(&text).unwrap();
        let keys = &config.accounts[0].api_keys;
        assert_eq!(keys[0], ApiKeyConfig::all_scopes(HASH));
        assert_eq!(keys[1].scopes, vec![Scope::Submit, Scope::Read]);
        assert_eq!((keys[1].rate_per_second, keys[1].burst), (Some(2), Some(5)));
        assert_eq!(config.accounts[0].rate_per_second, Some(10));
    }

    #[test]
    fn a_bad_scope_or_key_table_is_refused_by_name() {
        let unknown_scope = format!(
            "{MINIMAL}\n[[accounts]]\nname = \"a\"\napi_keys = [{{ hash = \"{HASH}\", scopes = [\"sumbit\"] }}]\n"
        );
        let err = parse(&unknown_scope).unwrap_err().to_string();
        assert!(err.contains("sumbit") && err.contains("submit"), "{err}");
        let no_scopes = format!(
            "{MINIMAL}\n[[accounts]]\nname = \"a\"\napi_keys = [{{ hash = \"{HASH}\", scopes = [] }}]\n"
        );
        let err = parse(&no_scopes).unwrap_err().to_string();
        assert!(err.contains("accounts[0].api_keys[0].scopes"), "{err}");
        let typo = format!(
            "{MINIMAL}\n[[accounts]]\nname = \"a\"\napi_keys = [{{ hash = \"{HASH}\", scope = [\"read\"] }}]\n"
        );
        let err = parse(&typo).unwrap_err().to_string();
        assert!(err.contains("scope"), "{err}");
    }

    #[test]
    fn rate_limits_and_http_limits_are_checked() {
        let text = format!(
            "{MINIMAL}\n[http]\nmax_header_bytes = 100\nmax_headers = 0\nmax_connections = 0\n\
             header_read_timeout = \"0s\"\n\
             [[accounts]]\nname = \"a\"\nrate_per_second = 0\nwebhook_batch = 0\n\
             api_keys = [{{ hash = \"{HASH}\", scopes = [\"read\"], burst = 3 }}]\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        for key in [
            "accounts[0].webhook_batch",
            "http.max_header_bytes",
            "http.max_headers",
            "http.max_connections",
            "http.header_read_timeout",
            "accounts[0].rate_per_second",
            "accounts[0].api_keys[0].burst",
        ] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
    }

    #[test]
    fn tls_files_are_read_at_validation() {
        let text = format!(
            "{MINIMAL}\n[http]\ntls = {{ cert_file = \"/nonexistent/cert.pem\", key_file = \"/nonexistent/key.pem\" }}\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("http.tls.cert_file"), "{err}");
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls");
        let text = format!(
            "{MINIMAL}\n[http]\ntls = {{ cert_file = \"{dir}/cert.pem\", key_file = \"{dir}/cert.pem\" }}\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("http.tls.key_file"), "{err}");
        let text = format!(
            "{MINIMAL}\n[http]\ntls = {{ cert_file = \"{dir}/cert.pem\", key_file = \"{dir}/key.pem\" }}\n"
        );
        assert!(parse(&text).unwrap().http.tls.is_some());
    }

    #[test]
    fn a_toml_error_names_its_line_and_never_shows_a_secret() {
        let cases = [
            // Unterminated: toml's own message would print the line.
            (
                "[[carriers]]\nname = \"x\"\npassword = \"hunter2\n",
                "hunter2",
                3,
            ),
            // A number where a string goes: serde's message quotes the value.
            ("[privacy]\npseudonym_key = 987654321\n", "987654321", 2),
            (
                "[store]\nurl = [\"postgres://u:hunter3@db/smsgw\"]\n",
                "hunter3",
                2,
            ),
        ];
        for (text, secret, line) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(!error.contains(secret), "{error}");
            assert!(error.contains(&format!("line {line},")), "{error}");
        }
        // Elsewhere the message keeps what it quotes: it names the field to fix.
        let error = parse("[messages]\nmax_segmentz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`max_segmentz`"), "{error}");
        assert!(error.contains("line 2, column 1"), "{error}");
        assert!(!error.contains(" | "), "no source snippet: {error}");
    }

    #[test]
    fn internal_webhook_receivers_need_the_allow_list_which_is_checked_by_key() {
        let account = |url: &str| {
            format!(
                "[[accounts]]\nname = \"a\"\napi_keys = [\"{HASH}\"]\n\
                 webhook_url = \"{url}\"\nwebhook_secret = \"s\"\n"
            )
        };
        for url in [
            "http://127.0.0.1:9000/hooks",
            "http://[::ffff:127.0.0.1]:9000/hooks",
            "http://10.1.2.3/hooks",
        ] {
            let err = parse(&format!("{MINIMAL}{}", account(url)))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("accounts[0].webhook_url") && err.contains("webhooks.allow_internal"),
                "{url}: {err}"
            );
        }
        // A name is judged when posted; a listed network is allowed.
        assert!(parse(&format!("{MINIMAL}{}", account("http://localhost:9000/"))).is_ok());
        let allowed = format!(
            "{MINIMAL}[webhooks]\nallow_internal = [\"127.0.0.1/32\", \"10.1.0.0/16\"]\n{}",
            account("http://[::ffff:127.0.0.1]:9000/hooks")
        );
        let config = parse(&allowed).unwrap();
        assert_eq!(config.webhooks.internal_networks().len(), 2);
        assert!(
            parse(&format!(
                "{MINIMAL}[webhooks]\nallow_internal = [\"10.1.0.0/16\"]\n{}",
                account("http://10.1.2.3/hooks")
            ))
            .is_ok()
        );

        let bad = format!(
            "{MINIMAL}[webhooks]\nallow_internal = [\"10.1.2.3/16\", \"hooks.internal\"]\n"
        );
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("webhooks.allow_internal[0]") && err.contains("10.1.0.0/16"),
            "{err}"
        );
        assert!(err.contains("webhooks.allow_internal[1]"), "{err}");
    }
}
