//! Micro-benchmarks of the per-message hot paths: segmentation, receipt parsing and
//! classification, SMPP framing, number parsing and API-key checks.
//!
//! Run with `cargo bench --bench hot_paths` (see benches/README.md).

use std::hint::black_box;
use std::str::FromStr;

use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rusmpp::pdus::{DeliverSm, SubmitSm};
use rusmpp::tlvs::MessageDeliveryRequestTlvValue;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{DataCoding, EsmClass, MessageState, Npi, RegisteredDelivery, Ton};
use rusmpp::{Command, CommandStatus};
use tokio_util::codec::{Decoder, Encoder};

use smsgw::api::auth::{Accounts, hash_key};
use smsgw::config::AccountConfig;
use smsgw::encoding::{self, Encoding};
use smsgw::message::Msisdn;
use smsgw::receipt::{self, Delivered};
use smsgw::smpp::codec::{Frame, FrameCodec};

/// Exactly 160 GSM-7 septets: the longest single-part message.
fn gsm_160() -> String {
    let text = "Your verification code is 482913. It expires in 10 minutes. Do not share this code \
                with anyone, including our staff. Questions? Reply HELP to this number.";
    let mut text = text.to_owned();
    while text.chars().count() < 160 {
        text.push('.');
    }
    text.truncate(160);
    text
}

/// A GSM-7 text of three parts (307..=459 septets), with an escape character (`€`) in it.
fn gsm_three_parts() -> String {
    "Order 7731 shipped! Total €129.50, tracking at example.com/t/7731 [DHL]. ".repeat(5)
}

/// UCS-2 because of the emoji (a surrogate pair) and Cyrillic: two parts.
fn ucs2_emoji() -> String {
    "Привет! Ваш заказ готов 👍 Заберите его до пятницы 🙂 Спасибо, что выбрали нас! ".repeat(2)
}

/// A receipt as SMPP 3.4 Appendix B writes it (what the simulator and most SMSCs send).
const RECEIPT_TEXT: &str = "id:1234567890 sub:001 dlvrd:001 submit date:2501311200 \
                            done date:2501311201 stat:DELIVRD err:000 text:Your verification";

fn bench_encoding(c: &mut Criterion) {
    let texts = [
        ("gsm7_160", gsm_160()),
        ("gsm7_3part", gsm_three_parts()),
        ("ucs2_emoji", ucs2_emoji()),
    ];
    // The texts must be what their names say, or the numbers mean something else.
    let plans: Vec<_> = texts.iter().map(|(_, t)| encoding::plan(t)).collect();
    assert_eq!(
        (plans[0].encoding, plans[0].segments, plans[0].units),
        (Encoding::Gsm7, 1, 160)
    );
    assert_eq!((plans[1].encoding, plans[1].segments), (Encoding::Gsm7, 3));
    assert_eq!(plans[2].encoding, Encoding::Ucs2);
    assert!(plans[2].segments >= 2);

    let mut group = c.benchmark_group("encoding");
    for (name, text) in &texts {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("plan/{name}"), |b| {
            b.iter(|| encoding::plan(black_box(text)))
        });
        group.bench_function(format!("split/{name}"), |b| {
            b.iter(|| encoding::split(black_box(text), black_box(0x5A)))
        });
    }
    group.finish();
}

/// A receipt deliver_sm as the simulator builds it: esm_class 0x04, message_state and
/// receipted_message_id TLVs, and the Appendix-B text in short_message.
fn receipt_pdu() -> DeliverSm {
    DeliverSm::builder()
        .source_addr_ton(Ton::International)
        .source_addr_npi(Npi::Isdn)
        .source_addr(COctetString::from_str("46701234567").unwrap())
        .dest_addr_ton(Ton::Alphanumeric)
        .dest_addr_npi(Npi::Unknown)
        .destination_addr(COctetString::from_str("iP1").unwrap())
        .esm_class(EsmClass::from(0x04u8))
        .registered_delivery(RegisteredDelivery::from(0u8))
        .data_coding(DataCoding::McSpecific)
        .short_message(OctetString::from_str(RECEIPT_TEXT).unwrap())
        .push_tlv(MessageDeliveryRequestTlvValue::MessageState(
            MessageState::Delivered,
        ))
        .push_tlv(MessageDeliveryRequestTlvValue::ReceiptedMessageId(
            COctetString::from_str("1234567890").unwrap(),
        ))
        .build()
}

fn bench_receipts(c: &mut Criterion) {
    let mut group = c.benchmark_group("receipt");
    let parsed = receipt::parse_text(RECEIPT_TEXT).expect("the receipt text parses");
    assert_eq!(parsed.stat.as_deref(), Some("DELIVRD"));
    group.bench_function("parse_text/appendix_b", |b| {
        b.iter(|| receipt::parse_text(black_box(RECEIPT_TEXT)))
    });

    let pdu = receipt_pdu();
    assert!(matches!(receipt::classify(&pdu), Ok(Delivered::Receipt(_))));
    group.bench_function("classify/tlv_and_text", |b| {
        b.iter(|| receipt::classify(black_box(&pdu)))
    });
    group.bench_function("normalize_id", |b| {
        b.iter(|| receipt::normalize_id(black_box("0e999f21")))
    });
    group.finish();
}

/// The submit_sm of a one-part GSM-7 message, as `smsgw::smpp::submit_pdus` shapes it.
fn submit_command() -> Command {
    let (encoding, mut parts) = encoding::split("Hej! Your code is 1234", 0);
    let submit = SubmitSm::builder()
        .source_addr_ton(Ton::Alphanumeric)
        .source_addr_npi(Npi::Unknown)
        .source_addr(COctetString::from_str("iP1").unwrap())
        .dest_addr_ton(Ton::International)
        .dest_addr_npi(Npi::Isdn)
        .destination_addr(COctetString::from_str("46701234567").unwrap())
        .esm_class(EsmClass::from(0u8))
        .registered_delivery(RegisteredDelivery::from(0x01u8))
        .data_coding(DataCoding::from(encoding.data_coding()))
        .short_message(OctetString::from_vec(parts.remove(0)).unwrap())
        .build();
    Command::new(CommandStatus::EsmeRok, 42, submit)
}

fn bench_codec(c: &mut Criterion) {
    let command = submit_command();
    let mut codec = FrameCodec::new(4096);
    let mut encoded = BytesMut::new();
    codec.encode(&command, &mut encoded).unwrap();
    let frame_len = encoded.len();
    assert!(matches!(
        codec.decode(&mut encoded.clone()).unwrap(),
        Some(Frame::Command(_))
    ));

    let mut group = c.benchmark_group("smpp_codec");
    group.throughput(Throughput::Bytes(frame_len as u64));
    group.bench_function("encode/submit_sm", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            codec.encode(black_box(&command), &mut buf).unwrap();
        })
    });
    group.bench_function("decode/submit_sm", |b| {
        b.iter_batched_ref(
            || encoded.clone(),
            |buf| codec.decode(buf).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("encode_decode/submit_sm", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            codec.encode(black_box(&command), &mut buf).unwrap();
            codec.decode(&mut buf).unwrap()
        })
    });
    group.finish();
}

fn bench_msisdn(c: &mut Criterion) {
    // The numbering-plan metadata loads on first use; keep that out of the measurement.
    Msisdn::parse("+46701234567").unwrap();
    let mut group = c.benchmark_group("msisdn");
    for (name, input) in [
        ("e164", "+46701234567"),
        ("spaced", "+46 70 123 45 67"),
        ("us", "+1 (415) 555-2671"),
    ] {
        assert!(Msisdn::parse(input).is_ok(), "{input}");
        group.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| Msisdn::parse(black_box(input)))
        });
    }
    // Traffic to many countries: the mobile example number of 40 regions, in turn.
    let mixed: Vec<String> = phonenumber::metadata::DATABASE
        .iter()
        .filter_map(|meta| {
            let example = meta.descriptors().mobile()?.example()?;
            Some(format!("+{}{example}", meta.country_code()))
        })
        .filter(|number| Msisdn::parse(number).is_ok())
        .take(40)
        .collect();
    assert_eq!(mixed.len(), 40);
    let mut next = mixed.iter().cycle();
    group.bench_function("parse/mixed_40_countries", |b| {
        b.iter(|| Msisdn::parse(black_box(next.next().map_or("", String::as_str))))
    });
    group.finish();
}

/// An account as the configuration file writes it. Parsed rather than built field by field, so
/// that keys added to `[[accounts]]` later (with defaults) do not break the bench.
fn account(name: &str, keys: &[&str]) -> AccountConfig {
    let hashes: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", hash_key(k)))
        .collect();
    let text = format!(
        "name = \"{name}\"\napi_keys = [{}]\nwebhook_url = \"http://127.0.0.1:9/{name}\"\n\
         webhook_secret = \"secret-of-{name}\"\n",
        hashes.join(", ")
    );
    toml::from_str(&text).expect("a valid [[accounts]] table")
}

fn bench_auth(c: &mut Criterion) {
    // Three accounts, four keys: every key hash is compared on each request.
    let accounts = Accounts::from_config(&[
        account("shop", &["smsgw_shop_key_0123456789abcdef0123456789abcdef"]),
        account("bank", &["bank-key-1", "bank-key-2"]),
        account("crm", &["crm-key"]),
    ]);
    let bearer = |key: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        headers
    };
    let good = bearer("smsgw_shop_key_0123456789abcdef0123456789abcdef");
    let bad = bearer("smsgw_not_a_key_0123456789abcdef0123456789abcdef");
    assert_eq!(accounts.authenticate_bearer(&good).unwrap().0.name, "shop");
    assert!(accounts.authenticate_bearer(&bad).is_none());

    let mut group = c.benchmark_group("auth");
    group.bench_function("authenticate/valid", |b| {
        b.iter(|| accounts.authenticate_bearer(black_box(&good)).is_some())
    });
    group.bench_function("authenticate/unknown", |b| {
        b.iter(|| accounts.authenticate_bearer(black_box(&bad)).is_some())
    });
    group.finish();
}

/// Not a function of smsgw: the cost of one statement on a SQLite connection through sqlx (which
/// runs each connection on its own thread and hands every statement and every row across
/// threads; the store's readers and, before, its writer) and through rusqlite with a cached
/// statement on the calling thread (the store's writer now). Compares 100 rows written as 100
/// statements with the same 100 rows in one multi-row INSERT, in an open transaction (no fsync).
fn bench_sqlite_statements(c: &mut Criterion) {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
    use sqlx::{AssertSqlSafe, Connection};
    use std::sync::Arc;

    const ROWS: usize = 100;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("bench.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let conn = rt.block_on(async {
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL, \
             at INTEGER NOT NULL, status TEXT NOT NULL, detail TEXT)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        // One long transaction: measures the statements, not commits.
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        Arc::new(tokio::sync::Mutex::new(conn))
    });
    const ONE: &str = "INSERT INTO events (message_id, at, status, detail) VALUES (?, ?, ?, ?)";
    let many: Arc<str> = format!(
        "INSERT INTO events (message_id, at, status, detail) VALUES {}",
        vec!["(?, ?, ?, ?)"; ROWS].join(", ")
    )
    .into();

    let mut group = c.benchmark_group("sqlite_writer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sqlx_statement/1_row", |b| {
        b.to_async(&rt).iter(|| {
            let conn = conn.clone();
            async move {
                let mut conn = conn.lock().await;
                sqlx::query(ONE)
                    .bind("01a223dd-7b4b-738d-a599-a25452d8d82e")
                    .bind(1_700_000_000_000i64)
                    .bind("sent")
                    .bind(Option::<&str>::None)
                    .execute(&mut *conn)
                    .await
                    .unwrap();
            }
        })
    });
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("sqlx_statement/100_rows_as_100_statements", |b| {
        b.to_async(&rt).iter(|| {
            let conn = conn.clone();
            async move {
                let mut conn = conn.lock().await;
                for i in 0..ROWS {
                    sqlx::query(ONE)
                        .bind("01a223dd-7b4b-738d-a599-a25452d8d82e")
                        .bind(i as i64)
                        .bind("sent")
                        .bind(Option::<&str>::None)
                        .execute(&mut *conn)
                        .await
                        .unwrap();
                }
            }
        })
    });
    group.bench_function("sqlx_statement/100_rows_as_1_statement", |b| {
        b.to_async(&rt).iter(|| {
            let conn = conn.clone();
            let many = many.clone();
            async move {
                let mut conn = conn.lock().await;
                let mut query = sqlx::query(AssertSqlSafe(many));
                for i in 0..ROWS {
                    query = query
                        .bind("01a223dd-7b4b-738d-a599-a25452d8d82e")
                        .bind(i as i64)
                        .bind("sent")
                        .bind(Option::<&str>::None);
                }
                query.execute(&mut *conn).await.unwrap();
            }
        })
    });
    // The same rows as the store's writer now writes them: rusqlite on the calling thread,
    // a cached prepared statement (a second connection to the same file, its own transaction
    // after sqlx's is rolled back).
    rt.block_on(async {
        let mut conn = conn.lock().await;
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    });
    let direct = rusqlite::Connection::open(dir.path().join("bench.db")).unwrap();
    direct.execute_batch("BEGIN").unwrap();
    group.throughput(Throughput::Elements(1));
    group.bench_function("rusqlite_cached/1_row", |b| {
        b.iter(|| {
            let mut statement = direct.prepare_cached(ONE).unwrap();
            statement
                .execute(rusqlite::params![
                    "01a223dd-7b4b-738d-a599-a25452d8d82e",
                    1_700_000_000_000i64,
                    "sent",
                    Option::<&str>::None
                ])
                .unwrap();
        })
    });
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("rusqlite_cached/100_rows_as_100_statements", |b| {
        b.iter(|| {
            for i in 0..ROWS {
                let mut statement = direct.prepare_cached(ONE).unwrap();
                statement
                    .execute(rusqlite::params![
                        "01a223dd-7b4b-738d-a599-a25452d8d82e",
                        i as i64,
                        "sent",
                        Option::<&str>::None
                    ])
                    .unwrap();
            }
        })
    });
    group.finish();
    direct.execute_batch("ROLLBACK").unwrap();
}

/// The cost of the policy check on the submit path: a whole store submit of 100 messages
/// (policy, inserts, events, commit) against the policy's own lookup done 100 times, on a
/// store that holds 10,000 opt-outs and 1,000 number changes.
fn bench_policy_cost(c: &mut Criterion) {
    use smsgw::encoding::Encoding;
    use smsgw::message::{Category, MessageId, Pseudonymizer, Status, now_ms};
    use smsgw::policy::number_change::ChangeKind;
    use smsgw::store::sqlite::{FACTS_QUERY, SqliteStore};
    use smsgw::store::{AccountPolicy, NewMessage, NumberChange, OptOutSource, Store, StoreRules};
    use std::sync::Arc;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let db = dir.path().join("policy.db");
    let rules = StoreRules {
        pseudonyms: Pseudonymizer::new(b"bench-pseudonym-key"),
        suspect_after: 3,
        suspect_codes: vec!["001".into()],
    };
    let number = |i: usize| format!("+4670{:07}", i);
    let store: Arc<dyn Store> = rt.block_on(async {
        let store = SqliteStore::open(&db, 1024, rules.clone()).await.unwrap();
        let opt_outs = (0..10_000).map(|i| (number(i), None)).collect();
        let by = OptOutSource {
            source: "import",
            actor: None,
        };
        store
            .add_opt_outs("bench", opt_outs, by, AccountPolicy::default())
            .await
            .unwrap();
        let changes = (20_000..21_000)
            .map(|i| NumberChange {
                account: None,
                number: number(i),
                kind: ChangeKind::Deactivated,
                effective_at: now_ms() - 3_600_000,
                source: "import".into(),
            })
            .collect();
        store.add_number_changes(changes, vec![]).await.unwrap();
        Arc::new(store)
    });
    let batch = move || -> Vec<NewMessage> {
        let now = now_ms();
        (0..100)
            .map(|i| NewMessage {
                id: MessageId::new(),
                account: "bench".into(),
                reference: None,
                recipient: number(50_000 + i),
                sender: "iP1".into(),
                body: "Your code is 1234".into(),
                category: Category::Transactional,
                encoding: Encoding::Gsm7,
                segments: 1,
                priority: 0,
                webhook_url: None,
                consent_at: None,
                status: Status::Scheduled,
                detail: None,
                created_at: now,
                due_at: now + 3_600_000,
                expires_at: now + 7_200_000,
            })
            .collect()
    };
    // One connection inside a transaction, as the store's writer runs the lookup (rusqlite,
    // a cached statement).
    let lookup = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        Arc::new(std::sync::Mutex::new(conn))
    };

    let mut group = c.benchmark_group("policy_cost");
    group.throughput(Throughput::Elements(100));
    group.bench_function("store_submit_100_messages", |b| {
        b.to_async(&rt).iter_batched(
            batch,
            |messages| {
                let store = store.clone();
                async move {
                    let render = Arc::new(|_: &[NewMessage]| (202, String::new()));
                    store
                        .submit("bench", AccountPolicy::default(), messages, None, render)
                        .await
                        .unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("policy_lookup_x100", |b| {
        b.iter(|| {
            let conn = lookup.lock().unwrap();
            let mut statement = conn.prepare_cached(FACTS_QUERY).unwrap();
            for i in 0..100 {
                let recipient = number(50_000 + i);
                let key = rules.number_key(&recipient);
                statement
                    .query_row(rusqlite::params![recipient, "bench", key, "iP1"], |r| {
                        r.get::<_, bool>(0)
                    })
                    .unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_policy_cost,
    bench_encoding,
    bench_receipts,
    bench_codec,
    bench_msisdn,
    bench_auth,
    bench_sqlite_statements
);
criterion_main!(benches);
