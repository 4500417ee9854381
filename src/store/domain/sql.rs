//! What a backend supplies: its statements, each a method of [`Sql`], run inside the
//! transaction the backend opened. The rules that call them are in the other files of this
//! module; a method here decides nothing beyond what its statement says.
//!
//! Methods that take many rows at once (`insert_events`, `outbox_done`) let a backend with
//! round trips (PostgreSQL) run one statement for all of them; an embedded one (SQLite) loops
//! over a prepared statement.

use crate::message::Status;
use crate::policy::number_change::ChangeEvent;
use crate::receipt::Receipt;
use crate::store::handoff::Handoff;
use crate::store::{
    Erasure, IdempotentAnswer, NewMessage, NumberChange, OptOutSource, ParkedReceipt, ReceiptQuery,
    StoreError, StoreRules, WebhookJob,
};

/// Whose message an event is about, and where its status changes are posted (if anywhere).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub account: String,
    pub url: Option<String>,
    pub reference: Option<String>,
}

/// A message row a statement changed: `RETURNING id, account, webhook_url, reference`.
#[derive(Debug, Clone)]
pub(crate) struct ChangedRow {
    pub id: String,
    pub target: Target,
}

/// What the store knows about a message's recipient that the policy needs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Facts {
    /// The number has number-change events visible to the account.
    pub changed: bool,
    /// The account holds an opt-out of the number for this sender or for all its senders.
    pub opted_out: bool,
    /// Carriers reported the number unknown often enough to hold its messages.
    pub suspect: bool,
}

/// A row the claim took: what sending needs, and what the policy checks again.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRow {
    pub id: String,
    pub account: String,
    pub recipient: String,
    pub sender: String,
    pub body: Option<String>,
    pub encoding: String,
    pub segments: i64,
    /// Including this one.
    pub attempts: i64,
    pub expires_at: i64,
    pub category: String,
    pub priority: i64,
    pub consent_at: Option<i64>,
    pub service_messages: bool,
    /// The policy generation the message was decided in.
    pub policy_gen: i64,
}

/// The newest part a carrier message id names.
#[derive(Debug, Clone)]
pub(crate) struct PartRow {
    pub message_id: String,
    pub part: i64,
    pub state: String,
    pub updated_at: i64,
}

/// A message with what its parts have reached, for the roll-up of a receipt.
#[derive(Debug, Clone)]
pub(crate) struct RollupRow {
    pub status: String,
    pub segments: i64,
    /// Parts recorded as accepted by a carrier.
    pub parts: i64,
    pub delivered: i64,
    pub target: Target,
    pub recipient: String,
}

/// A line of a message's history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewEvent<'a> {
    pub message_id: &'a str,
    pub at: i64,
    pub status: Status,
    pub detail: Option<&'a str>,
    pub error_code: Option<&'a str>,
}

/// A webhook as the outbox holds it until it is posted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxRow<'a> {
    pub account: &'a str,
    pub url: &'a str,
    pub payload: &'a str,
    /// Posts tried so far.
    pub attempts: u32,
    pub created_at: i64,
    pub due_at: i64,
    pub last_error: Option<&'a str>,
}

/// An inbound SMS as stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InboundRow<'a> {
    pub id: &'a str,
    pub account: Option<&'a str>,
    pub carrier: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub body: &'a str,
    pub received_at: i64,
}

/// The statements of a backend, inside one open transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) trait Sql {
    // --- the transaction's context ---

    /// How numbers are pseudonymised and which carrier results make a number suspect.
    fn rules(&self) -> &StoreRules;
    /// The policy generation a decision made now is stamped with.
    fn policy_generation(&self) -> i64;
    /// A fact of the policy changed: messages decided before are checked again at send time.
    fn policy_changed(&mut self);
    /// A number change takes effect later, at `effective_at`: the facts change by themselves.
    fn number_change_dated(&mut self, effective_at: i64);
    /// Moves the generation on if a dated number change has taken effect by `now`.
    async fn policy_tick(&mut self, now: i64) -> Result<(), StoreError>;
    /// The in-memory hand-off of webhooks to this process's sender, for a backend whose
    /// status events can be their durable copy (one process per database).
    fn handoff(&self) -> Option<&Handoff>;

    // --- submissions ---

    async fn idempotent_answer(
        &mut self,
        account: &str,
        key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError>;
    async fn insert_idempotent_answer(
        &mut self,
        account: &str,
        answer: &IdempotentAnswer,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Inserts a message decided in the current policy generation.
    async fn insert_message(
        &mut self,
        m: &NewMessage,
        service_messages: bool,
    ) -> Result<(), StoreError>;

    // --- policy facts ---

    /// `key`: the recipient's opt-out key ([`StoreRules::number_key`]).
    async fn facts(
        &mut self,
        account: &str,
        recipient: &str,
        key: &str,
        sender: &str,
    ) -> Result<Facts, StoreError>;
    async fn change_events(
        &mut self,
        account: &str,
        number: &str,
    ) -> Result<Vec<ChangeEvent>, StoreError>;

    // --- opt-outs ---

    /// False when the entry was there already.
    async fn insert_opt_out(
        &mut self,
        account: &str,
        key: &str,
        number: &str,
        scope: &str,
        source: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Removes the entries of one scope, or (`scope` None) all of them; returns their scopes.
    async fn delete_opt_outs(
        &mut self,
        account: &str,
        key: &str,
        scope: Option<&str>,
    ) -> Result<Vec<String>, StoreError>;
    async fn journal_opt_out(
        &mut self,
        account: &str,
        key: &str,
        number: &str,
        scope: &str,
        action: &str,
        by: &OptOutSource,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Refuses the waiting messages an opt-out covers (`scope` "" is every sender); a
    /// transactional one stays when the account may send service messages.
    async fn refuse_opted_out(
        &mut self,
        account: &str,
        number: &str,
        scope: &str,
        service_messages: bool,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError>;

    // --- number changes and suspect numbers ---

    async fn insert_number_change(
        &mut self,
        change: &NumberChange,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Messages waiting for `number` (of `account` only, when given): id, account, consent.
    async fn waiting_for(
        &mut self,
        number: &str,
        account: Option<&str>,
    ) -> Result<Vec<(String, String, Option<i64>)>, StoreError>;
    async fn set_recipient(&mut self, id: &str, recipient: &str) -> Result<(), StoreError>;
    /// Counts an unknown-subscriber result: the failures so far, and whether the number was
    /// suspect already.
    async fn count_failure(&mut self, number: &str, now: i64) -> Result<(u32, bool), StoreError>;
    async fn mark_suspect(&mut self, number: &str) -> Result<(), StoreError>;
    /// Holds the waiting messages of a number now suspect.
    async fn hold_waiting(
        &mut self,
        number: &str,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError>;
    /// A delivery shows the number works: failures counted (not yet suspect) are forgotten.
    async fn reset_failures(&mut self, number: &str) -> Result<(), StoreError>;
    /// Removes the suspect mark and failure count; returns how many rows went.
    async fn delete_suspect(&mut self, number: &str) -> Result<u64, StoreError>;
    /// Queues again the messages held for `number` (of `account` only, when given).
    async fn release_held(
        &mut self,
        number: &str,
        account: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError>;
    /// Deletes what an account holds about a number, keeping number changes and the opt-outs
    /// as pseudonymised suppressions (GDPR art. 17).
    async fn erase_subject(
        &mut self,
        account: &str,
        number: &str,
        key: &str,
    ) -> Result<Erasure, StoreError>;

    // --- message status ---

    /// Moves one message to `status`, releasing any claim.
    async fn set_status(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        now: i64,
    ) -> Result<ChangedRow, StoreError>;
    /// Appends to a message's history; `hook`: the event is the durable copy of a handed
    /// webhook. Returns the event's id.
    async fn insert_event(&mut self, event: &NewEvent<'_>, hook: bool) -> Result<i64, StoreError>;
    /// Appends many events that no webhook depends on.
    async fn insert_events(&mut self, events: &[NewEvent<'_>]) -> Result<(), StoreError>;

    // --- sending ---

    /// Takes up to `limit` due messages, leased until `lease_until`.
    async fn claim_due(
        &mut self,
        limit: usize,
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<ClaimRow>, StoreError>;
    /// Parts a carrier accepted in an earlier attempt.
    async fn accepted_parts(&mut self, id: &str) -> Result<Vec<u32>, StoreError>;
    async fn record_part(
        &mut self,
        id: &str,
        part: u32,
        carrier: &str,
        carrier_message_id: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Moves a message this process is sending (claimed, not moved on since) to the
    /// attempt's result; its target and recipient, or None when it was not in our hands.
    async fn finish_attempt(
        &mut self,
        id: &str,
        status: Status,
        detail: Option<&str>,
        error_code: Option<&str>,
        carrier: Option<&str>,
        due_at: Option<i64>,
        now: i64,
    ) -> Result<Option<(Target, String)>, StoreError>;
    /// Removes and returns the receipts parked for a carrier id (state, error code).
    async fn take_parked(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
    ) -> Result<Vec<(String, Option<String>)>, StoreError>;
    /// Parked receipts whose part another transaction stored meanwhile (a backend where two
    /// transactions can run at once); removed and returned with their carrier.
    async fn adoptable_parked(&mut self) -> Result<Vec<(String, Receipt)>, StoreError>;
    /// Queues again what is `sending` whose lease ended (all of it, with `all`).
    async fn release_claims(
        &mut self,
        all: bool,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError>;
    async fn expire_overdue(
        &mut self,
        detail: &str,
        now: i64,
    ) -> Result<Vec<ChangedRow>, StoreError>;
    /// Queues an ended message again (an operator's retry), forgetting its parts.
    async fn requeue_ended(
        &mut self,
        id: &str,
        detail: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<Option<Target>, StoreError>;
    /// Cancels a waiting message (of `account`, when given).
    async fn cancel_waiting(
        &mut self,
        id: &str,
        account: Option<&str>,
        detail: &str,
        now: i64,
    ) -> Result<Option<Target>, StoreError>;
    async fn status_of(
        &mut self,
        id: &str,
        account: Option<&str>,
    ) -> Result<Option<String>, StoreError>;

    // --- receipts ---

    async fn newest_part(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
    ) -> Result<Option<PartRow>, StoreError>;
    /// Keeps a receipt whose part is not known yet (and drops those parked too long).
    async fn park_receipt(
        &mut self,
        carrier: &str,
        carrier_message_id: &str,
        receipt: &Receipt,
        now: i64,
    ) -> Result<(), StoreError>;
    async fn set_part_state(
        &mut self,
        part: &PartRow,
        state: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Ends a one-part message not ended yet (the common case of a final receipt) with a
    /// receipt's status; its target and recipient, or None when it is not such a message.
    async fn close_single_part(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        error_code: Option<&str>,
        now: i64,
    ) -> Result<Option<(Target, String)>, StoreError>;
    async fn rollup(&mut self, id: &str) -> Result<Option<RollupRow>, StoreError>;
    async fn set_final_status(
        &mut self,
        id: &str,
        status: Status,
        detail: &str,
        error_code: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError>;
    async fn take_unmatched(
        &mut self,
        carrier: &str,
        received_before: i64,
    ) -> Result<Vec<ParkedReceipt>, StoreError>;
    async fn claim_queries(
        &mut self,
        carrier: &str,
        accepted_before: i64,
        limit: u32,
        now: i64,
    ) -> Result<Vec<ReceiptQuery>, StoreError>;

    // --- inbound ---

    async fn insert_inbound(&mut self, row: &InboundRow<'_>) -> Result<(), StoreError>;
    /// An opt-out of the number for `sender`, or for every sender.
    async fn has_opt_out(
        &mut self,
        account: &str,
        key: &str,
        sender: &str,
    ) -> Result<bool, StoreError>;

    // --- webhooks ---

    async fn insert_outbox(&mut self, row: &OutboxRow<'_>) -> Result<(), StoreError>;
    async fn claim_outbox(
        &mut self,
        limit: usize,
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<WebhookJob>, StoreError>;
    /// Delivered or given up: the rows leave the outbox.
    async fn outbox_done(&mut self, ids: &[i64]) -> Result<(), StoreError>;
    async fn outbox_retry(&mut self, id: i64, at: i64, error: &str) -> Result<(), StoreError>;
    /// Not posted: waiting again at once, the attempt not counted.
    async fn outbox_unposted(&mut self, id: i64) -> Result<(), StoreError>;
    /// Not posted (its account's receiver is behind): waiting again from `at`, the attempt
    /// not counted.
    async fn outbox_defer(&mut self, id: i64, at: i64) -> Result<(), StoreError>;
    /// Every handed webhook up to this event id is settled.
    async fn settle_handed(&mut self, through: i64) -> Result<(), StoreError>;

    // --- retention ---

    /// Runs the rest of the transaction's statements so that `rollback_dry_run` undoes them.
    async fn begin_dry_run(&mut self) -> Result<(), StoreError>;
    async fn rollback_dry_run(&mut self) -> Result<(), StoreError>;
    /// Ended messages created before `id_before` that still have their text: id, recipient.
    async fn messages_with_text(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError>;
    async fn anonymise_message(&mut self, id: &str, recipient: &str) -> Result<(), StoreError>;
    /// Inbound SMS received before `id_before` that still have their text: id, sender.
    async fn inbound_with_text(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError>;
    async fn anonymise_inbound(&mut self, id: &str, sender: &str) -> Result<(), StoreError>;
    async fn delete_webhooks_before(&mut self, at: i64, limit: u32) -> Result<u64, StoreError>;
    async fn delete_events_before(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<u64, StoreError>;
    async fn canceled_before(
        &mut self,
        id_before: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;
    async fn delete_message(&mut self, id: &str) -> Result<(), StoreError>;
    async fn delete_idempotency_before(&mut self, at: i64) -> Result<u64, StoreError>;
}
