//! query_sm for messages whose receipt never came (`query_after` per carrier): every so often,
//! the parts accepted longer ago than that and still without a final receipt are asked about,
//! and a final answer is applied as if it were the receipt.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Receipt, ReceiptState};
use crate::message::{Sender, now_ms};
use crate::smpp::query::query_pdu;
use crate::smpp::{Carrier, SubmitOutcome};
use crate::store::{ReceiptQuery, Store};

/// Parts asked about per round; the bind's window and rate pace them.
const PER_ROUND: u32 = 100;

/// Runs until `stop`: asks `carrier` about parts still open `after` their acceptance.
pub async fn run(
    store: Arc<dyn Store>,
    carrier: Arc<Carrier>,
    after: Duration,
    stop: CancellationToken,
) {
    let every = (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        if !carrier.is_bound() {
            continue;
        }
        // A full round means more are waiting: go on at once.
        while let Some(asked) = round(&*store, &carrier, after).await
            && asked == PER_ROUND as usize
            && carrier.is_bound()
            && !stop.is_cancelled()
        {}
    }
}

/// One round; how many parts were asked about, None when the store failed.
async fn round(store: &dyn Store, carrier: &Carrier, after: Duration) -> Option<usize> {
    let before = now_ms() - after.as_millis() as i64;
    let queries = match store
        .claim_receipt_queries(&carrier.name, before, PER_ROUND)
        .await
    {
        Ok(queries) => queries,
        Err(error) => {
            warn!(carrier = %carrier.name, %error, "finding messages to query failed");
            return None;
        }
    };
    let asked = queries.len();
    let answers = futures::future::join_all(queries.into_iter().map(|query| async move {
        let pdu = query_pdu(
            &query.carrier_message_id,
            &Sender::from_stored(&query.sender),
        );
        (query, carrier.query(pdu).await)
    }))
    .await;
    let mut closed = 0;
    for (query, outcome) in answers {
        crate::metrics::receipt_query(&carrier.name, result_label(&outcome));
        let Some(receipt) = as_receipt(&query, &outcome) else {
            debug!(carrier = %carrier.name, id = %query.message_id, part = query.part, ?outcome, "query_sm gave no final state");
            continue;
        };
        match store.apply_receipt(&carrier.name, receipt).await {
            Ok(_) => closed += 1,
            Err(error) => {
                warn!(carrier = %carrier.name, id = %query.message_id, %error, "storing a query_sm answer failed")
            }
        }
    }
    if closed > 0 {
        info!(carrier = %carrier.name, asked, closed, "query_sm found the final state of parts whose receipt never came");
    }
    Some(asked)
}

fn result_label(outcome: &SubmitOutcome) -> &'static str {
    match outcome {
        SubmitOutcome::Queried { message_state, .. } => {
            match ReceiptState::from_message_state(*message_state) {
                Some(state) if state.is_final() => "final",
                _ => "pending",
            }
        }
        SubmitOutcome::Rejected { .. } => "refused",
        _ => "unanswered",
    }
}

/// A final message_state, as the receipt that never came; anything else changes nothing.
fn as_receipt(query: &ReceiptQuery, outcome: &SubmitOutcome) -> Option<Receipt> {
    let SubmitOutcome::Queried {
        message_state,
        error_code,
    } = outcome
    else {
        return None;
    };
    let state = ReceiptState::from_message_state(*message_state).filter(|s| s.is_final())?;
    Some(Receipt {
        carrier_message_id: query.carrier_message_id.clone(),
        state,
        // Written like a text receipt's `err:`, so suspect_codes apply alike.
        error_code: Some(format!("{error_code:03}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;

    fn query() -> ReceiptQuery {
        ReceiptQuery {
            message_id: MessageId::new(),
            part: 1,
            carrier_message_id: "5A3F21".into(),
            sender: "iP1".into(),
        }
    }

    #[test]
    fn only_final_answers_become_receipts() {
        let answer = |message_state, error_code| SubmitOutcome::Queried {
            message_state,
            error_code,
        };
        let delivered = as_receipt(&query(), &answer(2, 0)).unwrap();
        assert_eq!(delivered.state, ReceiptState::Delivered);
        assert_eq!(delivered.carrier_message_id, "5A3F21");
        let undeliverable = as_receipt(&query(), &answer(5, 1)).unwrap();
        assert_eq!(undeliverable.state, ReceiptState::Undeliverable);
        assert_eq!(undeliverable.error_code.as_deref(), Some("001"));
        for pending in [0, 1, 6, 42] {
            assert_eq!(as_receipt(&query(), &answer(pending, 0)), None, "{pending}");
        }
        let refused = SubmitOutcome::Rejected { status: 0x67 };
        assert_eq!(as_receipt(&query(), &refused), None);
    }
}
