//! query_sm (DOMAIN.md §1.2): asking the carrier what became of a message whose receipt never
//! came. It travels like a submit_sm, in the window and within the rate of a bind.

use rusmpp::pdus::{QuerySm, QuerySmResp};

use super::status::ESME_ROK;
use super::{Carrier, SubmitOutcome, multipart::source_address};
use crate::message::Sender;

impl Carrier {
    /// Asks about one message; `Queried` carries the answer, `Rejected` the carrier's refusal
    /// (ESME_RQUERYFAIL: it does not know the id).
    pub async fn query(&self, pdu: QuerySm) -> SubmitOutcome {
        self.send(pdu.into(), false).await
    }
}

/// The query_sm for a message id as the carrier's submit_sm_resp gave it, sent by `sender`.
pub fn query_pdu(message_id: &str, sender: &Sender) -> QuerySm {
    let (ton, npi, source) = source_address(sender);
    QuerySm::builder()
        .message_id(message_id.parse().unwrap_or_default())
        .source_addr_ton(ton)
        .source_addr_npi(npi)
        .source_addr(source)
        .build()
}

/// What a query_sm_resp says.
pub(super) fn outcome(code: u32, resp: &QuerySmResp) -> SubmitOutcome {
    if code != ESME_ROK {
        return SubmitOutcome::Rejected { status: code };
    }
    SubmitOutcome::Queried {
        message_state: u8::from(resp.message_state),
        error_code: resp.error_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusmpp::values::{MessageState, Ton};

    #[test]
    fn the_query_names_the_id_and_the_sender() {
        let pdu = query_pdu("0a1B", &Sender::Alphanumeric("iP1".into()));
        assert_eq!(pdu.message_id.as_str(), "0a1B");
        assert_eq!(pdu.source_addr.as_str(), "iP1");
        assert_eq!(pdu.source_addr_ton, Ton::Alphanumeric);
    }

    #[test]
    fn answers_become_outcomes() {
        let resp = QuerySmResp::builder()
            .message_state(MessageState::Delivered)
            .error_code(0)
            .build();
        assert_eq!(
            outcome(ESME_ROK, &resp),
            SubmitOutcome::Queried {
                message_state: 2,
                error_code: 0
            }
        );
        assert_eq!(
            outcome(0x67, &resp),
            SubmitOutcome::Rejected { status: 0x67 }
        );
    }
}
