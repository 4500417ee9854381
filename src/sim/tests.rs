//! The simulator over real loopback TCP, driven by a tiny ESME written with `CommandCodec`.

use std::{str::FromStr, time::Duration};

use futures::{SinkExt, StreamExt};
use rusmpp::{
    Command, CommandId, CommandStatus, Pdu,
    pdus::{
        BindReceiver, BindTransceiver, BindTransmitter, CancelSm, DeliverSm, DeliverSmResp,
        QuerySm, SubmitSm,
    },
    tlvs::TlvValue,
    tokio_codec::CommandCodec,
    types::{COctetString, OctetString},
    values::{EsmClass, InterfaceVersion, MessageState, Npi, RegisteredDelivery, Ton},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{codec::Framed, sync::CancellationToken};

use super::*;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

struct Sim {
    handle: SimHandle,
    shutdown: CancellationToken,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn sim(config: SimConfig) -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let handle = start(listener, config, shutdown.clone());
    Sim { handle, shutdown }
}

fn fast() -> SimConfig {
    SimConfig {
        receipt_delay: Duration::from_millis(10),
        ..SimConfig::default()
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Tx,
    Rx,
    Trx,
}

/// A minimal ESME: one framed socket, its own sequence numbers.
struct Esme {
    framed: Framed<TcpStream, CommandCodec>,
    sequence: u32,
}

impl Esme {
    async fn connect(sim: &Sim) -> Self {
        let stream = TcpStream::connect(sim.handle.local_addr()).await.unwrap();
        Self {
            framed: Framed::new(stream, CommandCodec::new()),
            sequence: 0,
        }
    }

    async fn bound(sim: &Sim, kind: Kind) -> Self {
        let mut esme = Self::connect(sim).await;
        let response = esme.bind(kind, "smsgw", "secret").await;
        assert_eq!(response.status(), CommandStatus::EsmeRok);
        esme
    }

    async fn send(&mut self, pdu: impl Into<Pdu>) -> u32 {
        self.sequence += 1;
        let command = Command::new(CommandStatus::EsmeRok, self.sequence, pdu);
        self.framed.send(command).await.unwrap();
        self.sequence
    }

    async fn recv(&mut self) -> Command {
        tokio::time::timeout(WAIT, self.framed.next())
            .await
            .expect("timed out waiting for a PDU")
            .expect("connection closed")
            .expect("undecodable PDU")
    }

    /// Waits for the simulator to close the connection.
    async fn closed(&mut self) {
        let next = tokio::time::timeout(WAIT, self.framed.next())
            .await
            .expect("connection still open");
        assert!(
            matches!(next, None | Some(Err(_))),
            "expected close, got {next:?}"
        );
    }

    async fn bind(&mut self, kind: Kind, system_id: &str, password: &str) -> Command {
        let system_id = COctetString::from_str(system_id).unwrap();
        let password = COctetString::from_str(password).unwrap();
        let version = InterfaceVersion::Smpp3_4;
        let sequence = match kind {
            Kind::Tx => {
                let pdu = BindTransmitter::builder()
                    .system_id(system_id)
                    .password(password);
                self.send(pdu.interface_version(version).build()).await
            }
            Kind::Rx => {
                let pdu = BindReceiver::builder()
                    .system_id(system_id)
                    .password(password);
                self.send(pdu.interface_version(version).build()).await
            }
            Kind::Trx => {
                let pdu = BindTransceiver::builder()
                    .system_id(system_id)
                    .password(password);
                self.send(pdu.interface_version(version).build()).await
            }
        };
        let response = self.recv().await;
        assert_eq!(response.sequence_number(), sequence);
        response
    }

    async fn submit(&mut self, registered_delivery: u8) -> u32 {
        let submit = SubmitSm::builder()
            .source_addr_ton(Ton::Alphanumeric)
            .source_addr(COctetString::from_str("ACME").unwrap())
            .dest_addr_ton(Ton::International)
            .dest_addr_npi(Npi::Isdn)
            .destination_addr(COctetString::from_str("491701234567").unwrap())
            .esm_class(EsmClass::from(0u8))
            .registered_delivery(RegisteredDelivery::from(registered_delivery))
            .short_message(OctetString::from_str("Hello").unwrap())
            .build();
        self.send(submit).await
    }

    async fn ack(&mut self, deliver_sequence: u32) {
        let ack = Command::new(
            CommandStatus::EsmeRok,
            deliver_sequence,
            DeliverSmResp::default(),
        );
        self.framed.send(ack).await.unwrap();
    }
}

fn submit_resp_id(command: &Command) -> String {
    assert_eq!(command.id(), CommandId::SubmitSmResp, "{command:?}");
    match command.pdu() {
        Some(Pdu::SubmitSmResp(resp)) => resp.message_id().as_str().to_owned(),
        other => panic!("not a submit_sm_resp body: {other:?}"),
    }
}

fn deliver_sm(command: &Command) -> &DeliverSm {
    match command.pdu() {
        Some(Pdu::DeliverSm(deliver)) => deliver,
        other => panic!("not a deliver_sm: {other:?}"),
    }
}

/// (receipted_message_id, message_state) TLVs of a receipt.
fn receipt_tlvs(deliver: &DeliverSm) -> (Option<String>, Option<MessageState>) {
    let mut id = None;
    let mut state = None;
    for tlv in deliver.tlvs() {
        match tlv.value() {
            Some(TlvValue::ReceiptedMessageId(value)) => id = Some(value.as_str().to_owned()),
            Some(TlvValue::MessageState(value)) => state = Some(*value),
            _ => {}
        }
    }
    (id, state)
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn bind_is_accepted_and_enquire_link_answered() {
    let sim = sim(fast()).await;
    let mut esme = Esme::connect(&sim).await;
    let response = esme.bind(Kind::Trx, "smsgw", "secret").await;
    assert_eq!(response.status(), CommandStatus::EsmeRok);
    match response.pdu() {
        Some(Pdu::BindTransceiverResp(resp)) => {
            assert_eq!(resp.system_id.as_str(), "smsgw");
            assert_eq!(resp.sc_interface_version(), Some(InterfaceVersion::Smpp3_4));
        }
        other => panic!("expected bind_transceiver_resp, got {other:?}"),
    }
    assert_eq!(sim.handle.bound_count(), 1);
    assert_eq!(sim.handle.bind_attempts(), 1);

    let sequence = esme.send(Pdu::EnquireLink).await;
    let response = esme.recv().await;
    assert_eq!(response.id(), CommandId::EnquireLinkResp);
    assert_eq!(response.sequence_number(), sequence);
}

#[tokio::test]
async fn bad_password_is_refused_then_closed() {
    let sim = sim(fast()).await;
    let mut esme = Esme::connect(&sim).await;
    let response = esme.bind(Kind::Tx, "smsgw", "wrong").await;
    assert_eq!(response.id(), CommandId::BindTransmitterResp);
    assert_eq!(response.status(), CommandStatus::EsmeRinvpaswd);
    esme.closed().await;
    assert_eq!(sim.handle.bind_attempts(), 1);
    assert_eq!(sim.handle.bound_count(), 0);
}

#[tokio::test]
async fn submit_gets_an_id_then_a_matching_receipt() {
    let sim = sim(fast()).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    let sequence = esme.submit(0x01).await;
    let response = esme.recv().await;
    assert_eq!(response.sequence_number(), sequence);
    assert_eq!(response.status(), CommandStatus::EsmeRok);
    let id = submit_resp_id(&response);
    assert!(
        (9..=10).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit()),
        "{id}"
    );

    let receipt = esme.recv().await;
    let deliver = deliver_sm(&receipt);
    assert_eq!(u8::from(deliver.esm_class), 0x04);
    assert_eq!(deliver.source_addr.as_str(), "491701234567");
    assert_eq!(deliver.destination_addr.as_str(), "ACME");
    assert_eq!(
        receipt_tlvs(deliver),
        (Some(id.clone()), Some(MessageState::Delivered))
    );
    let text = std::str::from_utf8(deliver.short_message().as_ref()).unwrap();
    assert!(
        text.starts_with(&format!("id:{id} sub:001 dlvrd:001 submit date:")),
        "{text}"
    );
    assert!(text.ends_with(" stat:DELIVRD err:000 text:"), "{text}");
    esme.ack(receipt.sequence_number()).await;

    let submitted = sim.handle.submitted();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0].message_id, id);
    assert_eq!(submitted[0].source_addr, "ACME");
    assert_eq!(submitted[0].destination_addr, "491701234567");
    assert_eq!(submitted[0].short_message, b"Hello");
    assert_eq!(
        (submitted[0].esm_class, submitted[0].registered_delivery),
        (0x00, 0x01)
    );
    assert_eq!(sim.handle.submitted_count(), 1);
    eventually("deliver_sm_resp counted", || {
        sim.handle.deliver_sm_resp_count() == 1
    })
    .await;
}

#[tokio::test]
async fn message_ids_are_unique_and_no_receipt_unless_requested() {
    let sim = sim(fast()).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        esme.submit(0x00).await;
    }
    for _ in 0..20 {
        ids.push(submit_resp_id(&esme.recv().await).parse::<u64>().unwrap());
    }
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    // Nothing else arrives: an enquire_link is answered next, not a receipt.
    esme.send(Pdu::EnquireLink).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(esme.recv().await.id(), CommandId::EnquireLinkResp);
    assert_eq!(sim.handle.deliver_sm_sent(), 0);
}

#[tokio::test]
async fn receipt_before_response_quirk_sends_the_receipt_first() {
    let config = SimConfig {
        receipt_before_response: true,
        ..fast()
    };
    let sim = sim(config).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    let sequence = esme.submit(0x01).await;
    let first = esme.recv().await;
    let (receipted, _) = receipt_tlvs(deliver_sm(&first));
    let second = esme.recv().await;
    assert_eq!(second.sequence_number(), sequence);
    assert_eq!(receipted, Some(submit_resp_id(&second)));
}

#[tokio::test]
async fn submits_above_the_rate_are_throttled_without_receipts() {
    let config = SimConfig {
        throttle_above_per_second: Some(3),
        ..fast()
    };
    let sim = sim(config).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    for _ in 0..10 {
        esme.submit(0x00).await;
    }
    let mut ok = 0;
    let mut throttled = 0;
    for _ in 0..10 {
        match esme.recv().await.status() {
            CommandStatus::EsmeRok => ok += 1,
            CommandStatus::EsmeRthrottled => throttled += 1,
            other => panic!("unexpected status {other:?}"),
        }
    }
    // Normally 3 + 7; a burst straddling a window boundary may get up to 3 more through.
    assert!((3..=6).contains(&ok), "ok={ok}");
    assert_eq!(sim.handle.throttled_count(), throttled);
    assert_eq!(sim.handle.submitted_count(), ok);
}

#[tokio::test]
async fn live_knobs_reject_and_mark_undeliverable() {
    let sim = sim(fast()).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    sim.handle.set_config(SimConfig {
        reject_ratio: 1.0,
        ..fast()
    });
    esme.submit(0x01).await;
    assert_eq!(esme.recv().await.status(), CommandStatus::EsmeRsubmitfail);
    assert!(sim.handle.submitted().is_empty());

    sim.handle.set_config(SimConfig {
        undeliverable_ratio: 1.0,
        ..fast()
    });
    let id = {
        esme.submit(0x01).await;
        submit_resp_id(&esme.recv().await)
    };
    let receipt = esme.recv().await;
    let deliver = deliver_sm(&receipt);
    assert_eq!(
        receipt_tlvs(deliver),
        (Some(id), Some(MessageState::Undeliverable))
    );
    let text = std::str::from_utf8(deliver.short_message().as_ref()).unwrap();
    assert!(
        text.contains("dlvrd:000") && text.contains("stat:UNDELIV err:001"),
        "{text}"
    );
}

#[tokio::test]
async fn transmitter_receipts_arrive_on_a_receiver_session() {
    let sim = sim(fast()).await;
    let mut tx = Esme::bound(&sim, Kind::Tx).await;
    let mut rx = Esme::bound(&sim, Kind::Rx).await;
    tx.submit(0x01).await;
    let id = submit_resp_id(&tx.recv().await);
    let receipt = rx.recv().await;
    assert_eq!(receipt_tlvs(deliver_sm(&receipt)).0, Some(id));
    assert_eq!(sim.handle.bound_count(), 2);
}

#[tokio::test]
async fn receipts_wait_for_the_next_receiver_after_a_link_drop() {
    let sim = sim(fast()).await;
    let mut tx = Esme::bound(&sim, Kind::Tx).await;
    tx.submit(0x01).await;
    let id = submit_resp_id(&tx.recv().await);
    sim.handle.drop_links();
    tx.closed().await;
    eventually("sessions to unbind", || sim.handle.bound_count() == 0).await;
    // The receipt fell due while nobody could receive it; the next receiver gets it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut rx = Esme::bound(&sim, Kind::Rx).await;
    let receipt = rx.recv().await;
    assert_eq!(receipt_tlvs(deliver_sm(&receipt)).0, Some(id));
}

#[tokio::test]
async fn drop_links_closes_every_connection() {
    let sim = sim(fast()).await;
    let mut a = Esme::bound(&sim, Kind::Trx).await;
    let mut b = Esme::connect(&sim).await;
    // An answered enquire_link proves the simulator has taken the unbound connection on.
    b.send(Pdu::EnquireLink).await;
    assert_eq!(b.recv().await.id(), CommandId::EnquireLinkResp);
    assert_eq!(sim.handle.bound_count(), 1);
    sim.handle.drop_links();
    a.closed().await;
    b.closed().await;
    eventually("bound_count to drop", || sim.handle.bound_count() == 0).await;
    // The listener still accepts: the gateway can reconnect.
    let _again = Esme::bound(&sim, Kind::Trx).await;
    assert_eq!(sim.handle.bound_count(), 1);
}

#[tokio::test]
async fn send_mo_needs_a_receiving_session_and_picks_the_encoding() {
    let sim = sim(fast()).await;
    let err = sim
        .handle
        .send_mo("+491701234567", "12345", "hi")
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::NotBound));
    let _tx = Esme::bound(&sim, Kind::Tx).await;
    let err = sim
        .handle
        .send_mo("+491701234567", "12345", "hi")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SimError::NotBound),
        "a transmitter cannot receive"
    );

    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    sim.handle
        .send_mo("+491701234567", "12345", "Hi @ 5€")
        .await
        .unwrap();
    let mo = esme.recv().await;
    let deliver = deliver_sm(&mo);
    assert_eq!(u8::from(deliver.esm_class), 0x00);
    assert_eq!(u8::from(deliver.data_coding), 0x00);
    assert_eq!(deliver.source_addr.as_str(), "491701234567");
    assert_eq!(deliver.destination_addr.as_str(), "12345");
    assert_eq!(deliver.short_message().as_ref(), b"Hi \x00 5\x1b\x65");
    esme.ack(mo.sequence_number()).await;

    sim.handle
        .send_mo("491701234567", "12345", "Привет")
        .await
        .unwrap();
    let mo = esme.recv().await;
    let deliver = deliver_sm(&mo);
    assert_eq!(u8::from(deliver.data_coding), 0x08);
    let utf16: Vec<u8> = "Привет".encode_utf16().flat_map(u16::to_be_bytes).collect();
    assert_eq!(deliver.short_message().as_ref(), utf16.as_slice());
}

#[tokio::test]
async fn unbind_is_answered_then_the_connection_closes() {
    let sim = sim(fast()).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    let sequence = esme.send(Pdu::Unbind).await;
    let response = esme.recv().await;
    assert_eq!(response.id(), CommandId::UnbindResp);
    assert_eq!(response.sequence_number(), sequence);
    esme.closed().await;
    eventually("bound_count to drop", || sim.handle.bound_count() == 0).await;
}

#[tokio::test]
async fn wrong_state_and_unknown_commands_are_refused() {
    let sim = sim(fast()).await;
    let mut rx = Esme::bound(&sim, Kind::Rx).await;
    rx.submit(0x01).await;
    let response = rx.recv().await;
    assert_eq!(response.id(), CommandId::SubmitSmResp);
    assert_eq!(response.status(), CommandStatus::EsmeRinvbndsts);

    rx.send(QuerySm::default()).await;
    let response = rx.recv().await;
    assert_eq!(response.id(), CommandId::QuerySmResp);
    assert_eq!(response.status(), CommandStatus::EsmeRinvbndsts);

    let sequence = rx.send(CancelSm::default()).await;
    let response = rx.recv().await;
    assert_eq!(response.id(), CommandId::GenericNack);
    assert_eq!(response.status(), CommandStatus::EsmeRinvcmdid);
    assert_eq!(response.sequence_number(), sequence);

    let again = rx.bind(Kind::Rx, "smsgw", "secret").await;
    assert_eq!(again.status(), CommandStatus::EsmeRalybnd);
    assert_eq!(sim.handle.bind_attempts(), 2);
    assert_eq!(sim.handle.submitted_count(), 0);
}

#[tokio::test]
async fn hex_responses_with_decimal_text_only_receipts() {
    let sim = sim(SimConfig {
        response_ids: config::IdFormat::Hex,
        receipt_ids: config::ReceiptIds::Decimal,
        receipt_tlvs: false,
        ..fast()
    })
    .await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    esme.submit(0x01).await;
    let hex = submit_resp_id(&esme.recv().await);
    let number = u64::from_str_radix(&hex, 16).expect("a hex id");
    let receipt = esme.recv().await;
    let deliver = deliver_sm(&receipt);
    assert_eq!(receipt_tlvs(deliver), (None, None), "text only");
    let text = std::str::from_utf8(deliver.short_message().as_ref()).unwrap();
    assert!(
        text.starts_with(&format!("id:{number} ")),
        "{text} vs {hex}"
    );
}

#[tokio::test]
async fn query_sm_tells_the_state_of_what_was_submitted() {
    let sim = sim(SimConfig {
        receipts: false,
        // Long enough that the first query surely comes before it, on a loaded machine too.
        receipt_delay: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    esme.submit(0x01).await;
    let id = submit_resp_id(&esme.recv().await);
    let query = |id: &str| {
        QuerySm::builder()
            .message_id(COctetString::from_str(id).unwrap())
            .build()
    };
    let state_of = |command: &Command| match command.pdu() {
        Some(Pdu::QuerySmResp(resp)) => resp.message_state,
        other => panic!("not a query_sm_resp: {other:?}"),
    };
    esme.send(query(&id)).await;
    let early = esme.recv().await;
    assert_eq!(early.status(), CommandStatus::EsmeRok);
    assert_eq!(
        state_of(&early),
        MessageState::Enroute,
        "before the receipt is due"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        esme.send(query(&id)).await;
        if state_of(&esme.recv().await) == MessageState::Delivered {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    esme.send(query("1")).await;
    let unknown = esme.recv().await;
    assert_eq!(unknown.status(), CommandStatus::EsmeRqueryfail);
    assert!(sim.handle.query_count() >= 3);
    assert_eq!(sim.handle.deliver_sm_sent(), 0, "receipts are off");
}

#[tokio::test]
async fn shutdown_closes_connections() {
    let sim = sim(fast()).await;
    let mut esme = Esme::bound(&sim, Kind::Trx).await;
    sim.shutdown.cancel();
    esme.closed().await;
}

#[test]
fn config_parses_from_toml_with_humantime_and_rejects_unknown_keys() {
    let config: SimConfig = toml::from_str(
        "receipt_delay = \"1s 500ms\"\nthrottle_above_per_second = 100\nreject_ratio = 0.25",
    )
    .unwrap();
    assert_eq!(config.receipt_delay, Duration::from_millis(1500));
    assert_eq!(config.throttle_above_per_second, Some(100));
    assert_eq!(config.reject_ratio, 0.25);
    assert_eq!(config.system_id, "smsgw");
    assert!(toml::from_str::<SimConfig>("reciept_delay = \"1s\"").is_err());
}
