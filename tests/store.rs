//! The store's conformance suite: every case runs against SQLite and against PostgreSQL (a
//! database of its own per test, from `SMSGW_TEST_POSTGRES_URL`; said loudly when unset).
//! The last cases need two instances on one PostgreSQL database.

mod common;

use std::sync::Arc;

use common::pg::TestDb;
use smsgw::encoding::Encoding;
use smsgw::message::{Category, MessageId, Pseudonymizer, Status, now_ms};
use smsgw::policy::number_change::ChangeKind;
use smsgw::receipt::{InboundSms, Receipt, ReceiptState};
use smsgw::store::postgres::PostgresStore;
use smsgw::store::sqlite::SqliteStore;
use smsgw::store::*;

const TO: &str = "+46701234567";
const SUSPECT_CODE: &str = "0x0b";

fn rules() -> StoreRules {
    StoreRules {
        pseudonyms: Pseudonymizer::new(b"conformance"),
        suspect_after: 2,
        suspect_codes: vec![SUSPECT_CODE.into()],
    }
}

fn new_message(to: &str, category: Category, hook: Option<&str>) -> NewMessage {
    let now = now_ms();
    NewMessage {
        id: MessageId::new(),
        account: "a".into(),
        reference: Some("ref".into()),
        recipient: to.into(),
        sender: "iP1".into(),
        body: "hello".into(),
        category,
        encoding: Encoding::Gsm7,
        segments: 1,
        priority: 0,
        webhook_url: hook.map(str::to_owned),
        consent_at: Some(now - 86_400_000),
        status: Status::Queued,
        detail: None,
        created_at: now,
        due_at: now,
        expires_at: now + 3_600_000,
    }
}

/// The answer the API would give: the ids and statuses as stored.
fn render() -> RenderAnswer {
    Arc::new(|messages: &[NewMessage]| {
        let items: Vec<String> = messages
            .iter()
            .map(|m| format!("{}={}", m.id, m.status.as_str()))
            .collect();
        (202, items.join(","))
    })
}

async fn submit(store: &dyn Store, messages: Vec<NewMessage>) -> Vec<MessageId> {
    let ids = messages.iter().map(|m| m.id).collect();
    let result = store
        .submit("a", AccountPolicy::default(), messages, None, render())
        .await
        .unwrap();
    assert!(matches!(result, SubmitResult::Stored { .. }), "{result:?}");
    ids
}

async fn status(store: &dyn Store, id: MessageId) -> Status {
    store.get_message("a", id).await.unwrap().unwrap().status
}

fn lease() -> i64 {
    now_ms() + 60_000
}

fn sent(id: MessageId, carrier_id: &str) -> AttemptResult {
    AttemptResult {
        id,
        carrier: Some("sim".into()),
        accepted: vec![AcceptedPart {
            part: 1,
            carrier_message_id: carrier_id.into(),
        }],
        note: None,
        next: Next::Sent,
    }
}

fn receipt(carrier_id: &str, state: ReceiptState) -> Receipt {
    Receipt {
        carrier_message_id: carrier_id.into(),
        state,
        error_code: None,
    }
}

/// An opt-out as the HTTP API records it.
fn by_api() -> OptOutSource {
    OptOutSource {
        source: "api",
        actor: None,
    }
}

/// Submits one message, claims it and records it sent, accepted as `carrier_id`.
async fn one_sent(store: &dyn Store, carrier_id: &str) -> MessageId {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    store.claim_due(10, lease()).await.unwrap();
    store
        .record_attempts(vec![sent(ids[0], carrier_id)])
        .await
        .unwrap();
    ids[0]
}

// ---- the cases ----

async fn stored_messages_are_shown_and_listed_newest_first(store: &dyn Store) {
    let ids = submit(
        store,
        (0..3)
            .map(|_| new_message(TO, Category::Marketing, None))
            .collect(),
    )
    .await;
    let view = store.get_message("a", ids[0]).await.unwrap().unwrap();
    assert_eq!(view.status, Status::Queued);
    assert_eq!(view.recipient, TO);
    assert_eq!(view.events.len(), 1);
    assert!(store.get_message("b", ids[0]).await.unwrap().is_none());
    let filter = ListFilter {
        limit: 2,
        ..ListFilter::default()
    };
    let page = store.list_messages("a", &filter).await.unwrap();
    assert_eq!(
        page.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );
    let next = ListFilter {
        before: Some(ids[1]),
        ..filter
    };
    let page = store.list_messages("a", &next).await.unwrap();
    assert_eq!(page.iter().map(|m| m.id).collect::<Vec<_>>(), vec![ids[0]]);
    let (queued, oldest, _) = store.backlog().await.unwrap();
    assert_eq!(queued, 3);
    assert!(oldest.is_some());
    assert!(store.next_due().await.unwrap().is_some());
}

async fn an_idempotency_key_replays_the_first_answer(store: &dyn Store) {
    let key = IdempotencyRequest {
        key: "k1".into(),
        request_hash: "h1".into(),
    };
    let first = store
        .submit(
            "a",
            AccountPolicy::default(),
            vec![new_message(TO, Category::Marketing, None)],
            Some(key.clone()),
            render(),
        )
        .await
        .unwrap();
    let SubmitResult::Stored { answer, .. } = first else {
        panic!("first submit replayed")
    };
    let again = store
        .submit(
            "a",
            AccountPolicy::default(),
            vec![new_message(TO, Category::Marketing, None)],
            Some(key),
            render(),
        )
        .await
        .unwrap();
    let SubmitResult::Replay(replay) = again else {
        panic!("second submit stored: {again:?}")
    };
    assert_eq!(replay.answer, answer);
    assert_eq!(replay.request_hash, "h1");
    let stored = store.idempotent_answer("a", "k1").await.unwrap().unwrap();
    assert_eq!(stored.status_code, 202);
    let (queued, _, _) = store.backlog().await.unwrap();
    assert_eq!(queued, 1, "the replay stored nothing");
}

async fn a_claimed_message_is_sent_and_delivered_with_webhooks(store: &dyn Store) {
    let hook = "http://127.0.0.1:9/hooks";
    let ids = submit(
        store,
        vec![new_message(TO, Category::Marketing, Some(hook))],
    )
    .await;
    let claimed = store.claim_due(10, lease()).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, ids[0]);
    assert_eq!(claimed[0].attempt, 1);
    assert_eq!(claimed[0].body, "hello");
    assert!(store.claim_due(10, lease()).await.unwrap().is_empty());
    assert_eq!(status(store, ids[0]).await, Status::Sending);
    store
        .record_attempts(vec![sent(ids[0], "00AB")])
        .await
        .unwrap();
    assert_eq!(status(store, ids[0]).await, Status::Sent);
    // Receipts name the id as the carrier writes it: normalised on both sides.
    let matched = store
        .apply_receipt("sim", receipt("ab", ReceiptState::Delivered))
        .await
        .unwrap();
    assert_eq!(matched, ReceiptMatch::Matched);
    let view = store.get_message("a", ids[0]).await.unwrap().unwrap();
    assert_eq!(view.status, Status::Delivered);
    assert_eq!(view.carrier.as_deref(), Some("sim"));
    let jobs = store.claim_webhooks(100, lease()).await.unwrap();
    let statuses: Vec<String> = jobs
        .iter()
        .map(|j| {
            serde_json::from_str::<serde_json::Value>(&j.payload).unwrap()["status"].to_string()
        })
        .collect();
    assert_eq!(
        statuses,
        vec!["\"queued\"", "\"sent\"", "\"delivered\""],
        "one webhook per status change, sending not posted"
    );
    assert!(store.claim_webhooks(100, lease()).await.unwrap().is_empty());
    let results = jobs
        .into_iter()
        .map(|j| (j, WebhookResult::Delivered))
        .collect();
    store.webhook_results(results).await.unwrap();
    assert_eq!(store.next_webhook_due().await.unwrap(), None);
    assert_eq!(store.backlog().await.unwrap().2, 0);
}

/// A webhook the sender put off (its account's receiver is behind) waits until the time it
/// was given, and the put-off claim is not counted as an attempt.
async fn a_deferred_webhook_waits_until_its_time_uncounted(store: &dyn Store) {
    submit(
        store,
        vec![new_message(TO, Category::Marketing, Some("http://h/"))],
    )
    .await;
    let jobs = store.claim_webhooks(10, lease()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].attempts, 1);
    let now = now_ms();
    let defer = |jobs: Vec<WebhookJob>, at| {
        jobs.into_iter()
            .map(|j| (j, WebhookResult::Deferred { at }))
            .collect()
    };
    store.webhook_results(defer(jobs, now)).await.unwrap();
    let jobs = store.claim_webhooks(10, lease()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].attempts, 1, "the deferred claim was not an attempt");
    store
        .webhook_results(defer(jobs, now + 60_000))
        .await
        .unwrap();
    assert!(store.claim_webhooks(10, lease()).await.unwrap().is_empty());
    assert_eq!(store.next_webhook_due().await.unwrap(), Some(now + 60_000));
}

async fn a_receipt_before_its_submit_resp_is_parked_then_applied(store: &dyn Store) {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    store.claim_due(10, lease()).await.unwrap();
    let parked = store
        .apply_receipt("sim", receipt("77", ReceiptState::Delivered))
        .await
        .unwrap();
    assert_eq!(parked, ReceiptMatch::Parked);
    store
        .record_attempts(vec![sent(ids[0], "77")])
        .await
        .unwrap();
    assert_eq!(status(store, ids[0]).await, Status::Delivered);
}

async fn a_carrier_id_used_again_names_the_newest_part(store: &dyn Store) {
    let first = one_sent(store, "5a").await;
    // Parts are ordered by the millisecond of their last change.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = one_sent(store, "5a").await;
    let matched = store
        .apply_receipt("sim", receipt("5a", ReceiptState::Delivered))
        .await
        .unwrap();
    assert_eq!(matched, ReceiptMatch::Matched);
    assert_eq!(status(store, second).await, Status::Delivered);
    assert_eq!(status(store, first).await, Status::Sent);
}

async fn a_retry_is_claimed_again_when_due(store: &dyn Store) {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    store.claim_due(10, lease()).await.unwrap();
    let retry = AttemptResult {
        id: ids[0],
        carrier: Some("sim".into()),
        accepted: vec![],
        note: None,
        next: Next::Retry {
            at: now_ms() - 1,
            detail: "throttled".into(),
        },
    };
    store.record_attempts(vec![retry]).await.unwrap();
    assert_eq!(status(store, ids[0]).await, Status::Queued);
    let claimed = store.claim_due(10, lease()).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, 2);
}

async fn the_backlog_counts_waiting_messages_and_tells_when_the_earliest_was_due(
    store: &dyn Store,
) {
    assert_eq!(store.backlog().await.unwrap(), (0, None, 0));
    let overdue_since = now_ms() - 60_000;
    let late = NewMessage {
        due_at: overdue_since,
        ..new_message(TO, Category::Marketing, None)
    };
    let tomorrow = NewMessage {
        status: Status::Scheduled,
        due_at: now_ms() + 86_400_000,
        ..new_message(TO, Category::Marketing, None)
    };
    submit(store, vec![tomorrow.clone()]).await;
    let (queued, earliest_due, _) = store.backlog().await.unwrap();
    assert_eq!((queued, earliest_due), (1, Some(tomorrow.due_at)));
    // A message scheduled for later is waiting, but not late: the queue's age stays 0.
    assert_eq!(smsgw::metrics::overdue_ms(earliest_due, now_ms()), 0);
    submit(store, vec![late]).await;
    let (queued, earliest_due, _) = store.backlog().await.unwrap();
    assert_eq!((queued, earliest_due), (2, Some(overdue_since)));
    assert!(smsgw::metrics::overdue_ms(earliest_due, now_ms()) >= 60_000);
}

async fn only_ended_leases_are_released(store: &dyn Store) {
    submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(store.claim_due(1, now_ms() - 1).await.unwrap().len(), 1);
    assert_eq!(store.claim_due(1, lease()).await.unwrap().len(), 1);
    assert_eq!(store.release_claims(false).await.unwrap(), 1);
    let again = store.claim_due(10, lease()).await.unwrap();
    assert_eq!(again.len(), 1, "the released message is claimed again");
    assert_eq!(again[0].attempt, 2);
}

async fn an_opt_out_refuses_waiting_and_new_marketing(store: &dyn Store) {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    let by = by_api();
    let added = store
        .add_opt_outs(
            "a",
            vec![(TO.into(), None)],
            by.clone(),
            AccountPolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(added, 1);
    assert_eq!(status(store, ids[0]).await, Status::RefusedOptedOut);
    let later = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(status(store, later[0]).await, Status::RefusedOptedOut);
    let listed = store.list_opt_outs("a", None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].number.as_deref(), Some(TO));
    assert_eq!(store.remove_opt_out("a", TO, None, by).await.unwrap(), 1);
    let after = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(status(store, after[0]).await, Status::Queued);
}

async fn an_opt_out_from_one_sender_refuses_only_that_sender(store: &dyn Store) {
    let by = by_api();
    let entries = vec![(TO.into(), Some("iP1".into()))];
    store
        .add_opt_outs("a", entries, by, AccountPolicy::default())
        .await
        .unwrap();
    let from_it = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(status(store, from_it[0]).await, Status::RefusedOptedOut);
    let mut other = new_message(TO, Category::Marketing, None);
    other.sender = "Other".into();
    let from_other = submit(store, vec![other]).await;
    assert_eq!(status(store, from_other[0]).await, Status::Queued);
}

async fn an_opt_out_after_submission_stops_the_message_at_send_time(store: &dyn Store) {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    let by = by_api();
    store
        .add_opt_outs("a", vec![(TO.into(), None)], by, AccountPolicy::default())
        .await
        .unwrap();
    assert!(store.claim_due(10, lease()).await.unwrap().is_empty());
    assert_eq!(status(store, ids[0]).await, Status::RefusedOptedOut);
}

async fn a_number_change_refuses_older_consent(store: &dyn Store) {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    let change = NumberChange {
        account: None,
        number: TO.into(),
        kind: ChangeKind::Deactivated,
        effective_at: now_ms() - 1_000,
        source: "api".into(),
    };
    assert_eq!(
        store
            .add_number_changes(vec![change], vec![])
            .await
            .unwrap(),
        1
    );
    assert_eq!(status(store, ids[0]).await, Status::RefusedNumberChanged);
    let history = store.number_history("a", TO).await.unwrap();
    assert_eq!(history.changes.len(), 1);
    let later = submit(store, vec![new_message(TO, Category::Transactional, None)]).await;
    assert_eq!(status(store, later[0]).await, Status::RefusedNumberChanged);
}

async fn unknown_subscriber_results_hold_the_number_until_cleared(store: &dyn Store) {
    for _ in 0..2 {
        let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
        store.claim_due(10, lease()).await.unwrap();
        let failed = AttemptResult {
            id: ids[0],
            carrier: Some("sim".into()),
            accepted: vec![],
            note: None,
            next: Next::Finish {
                status: Status::Failed,
                detail: "unknown subscriber".into(),
                error_code: Some(SUSPECT_CODE.into()),
            },
        };
        store.record_attempts(vec![failed]).await.unwrap();
    }
    let history = store.number_history("a", TO).await.unwrap();
    assert!(history.suspect);
    assert_eq!(history.failures, 2);
    let held = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(status(store, held[0]).await, Status::HeldSuspect);
    assert!(store.clear_suspect(TO, None).await.unwrap());
    assert_eq!(status(store, held[0]).await, Status::Queued);
}

async fn cancel_and_operator_retry(store: &dyn Store) {
    let ids = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(
        store.cancel("b", ids[0]).await.unwrap(),
        CancelResult::NotFound
    );
    assert_eq!(
        store.cancel("a", ids[0]).await.unwrap(),
        CancelResult::Canceled
    );
    assert_eq!(
        store.cancel("a", ids[0]).await.unwrap(),
        CancelResult::TooLate(Status::Canceled)
    );
    let failed = submit(store, vec![new_message(TO, Category::Marketing, None)]).await;
    store.claim_due(10, lease()).await.unwrap();
    let result = AttemptResult {
        id: failed[0],
        carrier: Some("sim".into()),
        accepted: vec![],
        note: None,
        next: Next::Finish {
            status: Status::Failed,
            detail: "rejected".into(),
            error_code: Some("0x45".into()),
        },
    };
    store.record_attempts(vec![result]).await.unwrap();
    assert_eq!(store.queue(Status::Failed, 10).await.unwrap().len(), 1);
    assert!(store.retry(failed[0], lease()).await.unwrap());
    assert_eq!(status(store, failed[0]).await, Status::Queued);
    assert!(!store.retry(failed[0], lease()).await.unwrap());
}

async fn inbound_stop_opts_out_and_erasure_keeps_the_suppression(store: &dyn Store) {
    let owner = InboundOwner {
        account: "a".into(),
        webhook_url: Some("http://127.0.0.1:9/hooks".into()),
        keywords: Arc::new(Default::default()),
        policy: AccountPolicy::default(),
    };
    let sms = InboundSms {
        from: TO.trim_start_matches('+').into(),
        to: "46700000001".into(),
        text: "STOP".into(),
        concat: None,
    };
    store.store_inbound("sim", sms, Some(owner)).await.unwrap();
    let export = store.export_subject("a", TO).await.unwrap();
    assert_eq!(export.inbound.len(), 1);
    assert_eq!(export.opt_outs.len(), 1);
    let erased = store.erase_subject("a", TO).await.unwrap();
    assert_eq!(erased.inbound, 1);
    assert_eq!(erased.suppressions_kept, 1);
    let listed = store.list_opt_outs("a", None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].number, None,
        "the suppression stays, without the number"
    );
    // STOP opts out of the number it was sent to.
    let mut later = new_message(TO, Category::Marketing, None);
    later.sender = "46700000001".into();
    let later = submit(store, vec![later]).await;
    assert_eq!(status(store, later[0]).await, Status::RefusedOptedOut);
}

async fn overdue_messages_expire_and_purge_counts(store: &dyn Store) {
    let mut old = new_message(TO, Category::Marketing, None);
    old.expires_at = now_ms() - 1;
    let ids = submit(store, vec![old]).await;
    assert_eq!(store.expire_overdue().await.unwrap(), 1);
    assert_eq!(status(store, ids[0]).await, Status::Expired);
    let future = now_ms() + 1_000;
    let cutoffs = Cutoffs {
        bodies_before: future,
        events_before: 0,
        canceled_before: 0,
        idempotency_before: 0,
    };
    let dry = store.purge(cutoffs, 100, true).await.unwrap();
    assert_eq!(dry.message_bodies, 1);
    let done = store.purge(cutoffs, 100, false).await.unwrap();
    assert_eq!(done, dry, "a dry run counts what a purge removes");
    assert_eq!(
        store
            .purge(cutoffs, 100, false)
            .await
            .unwrap()
            .message_bodies,
        0
    );
    store.ping().await.unwrap();
}

async fn receipt_diagnosis_finds_known_ids_parked_receipts_and_parts_to_query(store: &dyn Store) {
    let id = one_sent(store, "00AB").await;
    let known = store
        .known_carrier_ids("sim", &["AB".into(), "CD".into()])
        .await
        .unwrap();
    assert_eq!(known, vec!["AB".to_owned()], "ids are looked up normalised");
    let parked = store
        .apply_receipt("sim", receipt("dead", ReceiptState::Delivered))
        .await
        .unwrap();
    assert_eq!(parked, ReceiptMatch::Parked);
    let given_up = store
        .take_unmatched_receipts("sim", now_ms() + 1)
        .await
        .unwrap();
    assert_eq!(given_up.len(), 1);
    assert_eq!(given_up[0].carrier_message_id, "DEAD");
    assert!(
        store
            .take_unmatched_receipts("sim", now_ms() + 1)
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let before_asking = now_ms();
    let queries = store
        .claim_receipt_queries("sim", now_ms() + 1, 10)
        .await
        .unwrap();
    assert_eq!(queries.len(), 1);
    assert_eq!(queries[0].message_id, id);
    assert_eq!(
        queries[0].carrier_message_id, "00AB",
        "as the carrier wrote it"
    );
    assert_eq!(queries[0].sender, "iP1");
    let again = store
        .claim_receipt_queries("sim", before_asking, 10)
        .await
        .unwrap();
    assert!(again.is_empty(), "asked about once per period");
}

// ---- both backends ----

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let (_dir, path) = super::common::temp_db();
                    let store = super::SqliteStore::open(&path, 64, super::rules()).await.unwrap();
                    super::$case(&store).await;
                    super::Store::close(&store).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(db) = super::TestDb::create(stringify!($case)).await else { return };
                    let store = super::PostgresStore::open(&db.url, 64, 16, super::rules()).await.unwrap();
                    super::$case(&store).await;
                    super::Store::close(&store).await;
                }
            )*
        }
    };
}

conformance!(
    stored_messages_are_shown_and_listed_newest_first,
    an_idempotency_key_replays_the_first_answer,
    a_claimed_message_is_sent_and_delivered_with_webhooks,
    a_deferred_webhook_waits_until_its_time_uncounted,
    a_receipt_before_its_submit_resp_is_parked_then_applied,
    a_carrier_id_used_again_names_the_newest_part,
    a_retry_is_claimed_again_when_due,
    the_backlog_counts_waiting_messages_and_tells_when_the_earliest_was_due,
    only_ended_leases_are_released,
    an_opt_out_refuses_waiting_and_new_marketing,
    an_opt_out_from_one_sender_refuses_only_that_sender,
    an_opt_out_after_submission_stops_the_message_at_send_time,
    a_number_change_refuses_older_consent,
    unknown_subscriber_results_hold_the_number_until_cleared,
    cancel_and_operator_retry,
    inbound_stop_opts_out_and_erasure_keeps_the_suppression,
    overdue_messages_expire_and_purge_counts,
    receipt_diagnosis_finds_known_ids_parked_receipts_and_parts_to_query,
);

// ---- two instances on one PostgreSQL database ----

async fn two_instances(test: &str) -> Option<(TestDb, PostgresStore, PostgresStore)> {
    let db = TestDb::create(test).await?;
    let a = PostgresStore::open(&db.url, 64, 16, rules()).await.unwrap();
    let b = PostgresStore::open(&db.url, 64, 16, rules()).await.unwrap();
    Some((db, a, b))
}

#[tokio::test]
async fn two_instances_never_claim_the_same_message() {
    let Some((_db, a, b)) = two_instances("claims").await else {
        return;
    };
    for _ in 0..20 {
        let batch = (0..25)
            .map(|_| new_message(TO, Category::Transactional, None))
            .collect();
        submit(&a, batch).await;
    }
    let mut seen = std::collections::HashSet::new();
    loop {
        let (from_a, from_b) = tokio::join!(a.claim_due(7, lease()), b.claim_due(7, lease()));
        let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
        if from_a.is_empty() && from_b.is_empty() {
            break;
        }
        for claimed in from_a.iter().chain(&from_b) {
            assert!(seen.insert(claimed.id), "{} claimed twice", claimed.id);
        }
    }
    assert_eq!(seen.len(), 500);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn an_instance_at_start_up_leaves_the_live_claims_of_another_alone() {
    let Some((_db, a, b)) = two_instances("startup").await else {
        return;
    };
    submit(&a, vec![new_message(TO, Category::Marketing, None)]).await;
    assert_eq!(a.claim_due(10, lease()).await.unwrap().len(), 1);
    assert_eq!(b.release_claims(true).await.unwrap(), 0);
    assert!(b.claim_due(10, lease()).await.unwrap().is_empty());
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn receipts_reach_any_instance_and_an_opt_out_at_one_stops_sending_at_the_other() {
    let Some((_db, a, b)) = two_instances("receipts").await else {
        return;
    };
    let ids = submit(&a, vec![new_message(TO, Category::Marketing, None)]).await;
    a.claim_due(10, lease()).await.unwrap();
    // The receipt reaches b before a has stored the submit_sm_resp.
    let parked = b
        .apply_receipt("sim", receipt("c0ffee", ReceiptState::Delivered))
        .await
        .unwrap();
    assert_eq!(parked, ReceiptMatch::Parked);
    a.record_attempts(vec![sent(ids[0], "c0ffee")])
        .await
        .unwrap();
    assert_eq!(status(&b, ids[0]).await, Status::Delivered);

    // An opt-out committed by another instance after a's message was checked (simulated:
    // written to the table directly) is caught when a claims it, once the shared policy
    // generation has moved (b records another opt-out).
    const OTHER: &str = "+46709999999";
    let ids = submit(&a, vec![new_message(OTHER, Category::Marketing, None)]).await;
    let by = by_api();
    sqlx::query(
        "INSERT INTO opt_outs (account, number_key, number, sender, source, created_at)
         VALUES ('a', $1, $2, '', 'api', 0)",
    )
    .bind(rules().number_key(OTHER))
    .bind(OTHER)
    .execute(&sqlx::PgPool::connect(&_db.url).await.unwrap())
    .await
    .unwrap();
    // b's own opt-out (another number) moves the shared policy generation.
    b.add_opt_outs(
        "a",
        vec![("+46708888888".into(), None)],
        by,
        AccountPolicy::default(),
    )
    .await
    .unwrap();
    assert!(a.claim_due(10, lease()).await.unwrap().is_empty());
    assert_eq!(status(&a, ids[0]).await, Status::RefusedOptedOut);
    a.close().await;
    b.close().await;
}

// ---- the two backends post the same bytes ----

/// A payload with the values that differ by when and where it was made (times, the ids of an
/// inbound SMS and of its automatic reply) blanked out: everything else, key order included,
/// is compared as bytes.
fn blank_times_and_ids(payload: &str) -> String {
    let mut out = payload.to_owned();
    for key in [
        "\"at\":\"",
        "\"received_at\":\"",
        "\"id\":\"",
        "\"message_id\":\"",
    ] {
        let mut from = 0;
        while let Some(start) = out[from..].find(key).map(|i| from + i + key.len()) {
            let end = out[start..].find('"').map_or(out.len(), |i| start + i);
            out.replace_range(start..end, "_");
            from = start + 1;
        }
    }
    out
}

/// The same story on a store: a message with a webhook sent and delivered, and a STOP reply.
async fn webhook_story(store: &dyn Store, message: NewMessage) -> Vec<String> {
    let id = message.id;
    submit(store, vec![message]).await;
    store.claim_due(10, lease()).await.unwrap();
    store.record_attempts(vec![sent(id, "77")]).await.unwrap();
    store
        .apply_receipt("sim", receipt("77", ReceiptState::Delivered))
        .await
        .unwrap();
    let owner = InboundOwner {
        account: "a".into(),
        webhook_url: Some("http://127.0.0.1:9/hooks".into()),
        keywords: Arc::new(smsgw::policy::opt_out::Keywords::default()),
        policy: AccountPolicy::default(),
    };
    let sms = InboundSms {
        from: TO.trim_start_matches('+').into(),
        to: "46700000001".into(),
        text: "STOP".into(),
        concat: None,
    };
    store.store_inbound("sim", sms, Some(owner)).await.unwrap();
    let jobs = store.claim_webhooks(100, lease()).await.unwrap();
    jobs.iter()
        .map(|j| blank_times_and_ids(&j.payload))
        .collect()
}

#[tokio::test]
async fn both_backends_post_byte_identical_webhooks() {
    let Some(db) = TestDb::create("same_bytes").await else {
        return;
    };
    let message = new_message(TO, Category::Marketing, Some("http://127.0.0.1:9/hooks"));
    let (_dir, path) = common::temp_db();
    let sqlite = SqliteStore::open(&path, 64, rules()).await.unwrap();
    let on_sqlite = webhook_story(&sqlite, message.clone()).await;
    sqlite.close().await;
    let postgres = PostgresStore::open(&db.url, 64, 16, rules()).await.unwrap();
    let on_postgres = webhook_story(&postgres, message).await;
    postgres.close().await;
    // queued, sent, delivered; the inbound STOP; its confirmation queued.
    assert_eq!(on_sqlite.len(), 5, "{on_sqlite:?}");
    assert_eq!(on_sqlite, on_postgres);
}
