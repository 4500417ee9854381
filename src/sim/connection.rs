//! One simulated SMSC session: a task owning the socket, answering the ESME's PDUs and writing
//! the deliver_sm (receipts, MOs) queued for it.
//!
//! The read loop never sleeps: delayed receipts are timer tasks that push onto this session's
//! outbound queue (STYLE.md §3, CRATES.md §2 (b)). Responses are batched: everything already
//! buffered on the socket or the queue is handled before one flush, which keeps a pipelined
//! ESME at tens of thousands of submit_sm per second.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{FutureExt, SinkExt, StreamExt};
use rusmpp::{
    Command, CommandId, CommandStatus, Pdu,
    pdus::{
        BindReceiverResp, BindTransceiverResp, BindTransmitterResp, DeliverSm, QuerySm,
        QuerySmResp, SubmitSm, SubmitSmResp,
    },
    tlvs::TlvValue,
    tokio_codec::{CommandCodec, EncodeError},
    types::COctetString,
    values::{InterfaceVersion, MessageState},
};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tokio_util::{codec::Framed, sync::CancellationToken};

use super::{
    Shared, SimConfig, SubmittedPdu,
    deliver::{Outcome, ReceiptJob},
};

/// deliver_sm that may wait in one session's queue before timers and `send_mo` wait for room.
const OUTBOUND_CAPACITY: usize = 4096;
/// PDUs handled per flush when input is already buffered.
const BATCH: usize = 256;
/// Highest sequence number; ours wrap back to 1 after it (SMPP 3.4 §5.1.4).
const MAX_SEQUENCE: u32 = 0x7FFF_FFFF;
/// deliver_sm written and not yet answered that one session remembers for redelivery; beyond
/// this (an ESME that never answers) further ones are fire-and-forget.
const UNACKED_CAPACITY: usize = 100_000;
/// How long a deliver_sm answered with an error waits before it is sent again.
const REDELIVER_AFTER: Duration = Duration::from_secs(1);

/// The byte stream of one connection: plain TCP or TLS.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// How a bind asked to use the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindKind {
    Transmitter,
    Receiver,
    Transceiver,
}

impl BindKind {
    fn can_submit(self) -> bool {
        matches!(self, BindKind::Transmitter | BindKind::Transceiver)
    }

    fn can_receive(self) -> bool {
        matches!(self, BindKind::Receiver | BindKind::Transceiver)
    }

    /// The counter of sessions bound this way.
    fn counter(self, counters: &super::Counters) -> &std::sync::atomic::AtomicUsize {
        match self {
            BindKind::Transmitter => &counters.bound_tx,
            BindKind::Receiver => &counters.bound_rx,
            BindKind::Transceiver => &counters.bound_trx,
        }
    }

    fn response(self, system_id: COctetString<1, 16>, version: Option<InterfaceVersion>) -> Pdu {
        match self {
            BindKind::Transmitter => BindTransmitterResp::new(system_id, version).into(),
            BindKind::Receiver => BindReceiverResp::new(system_id, version).into(),
            BindKind::Transceiver => BindTransceiverResp::new(system_id, version).into(),
        }
    }
}

/// Why a session ended (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Shutdown,
    LinkDropped,
    PeerClosed,
    Unbound,
    BindRefused,
    DecodeError,
    WriteFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close(End),
}

enum Event {
    Inbound(Option<Result<Command, rusmpp::tokio_codec::DecodeError>>),
    Outbound(DeliverSm),
}

/// Serves one accepted TCP connection until the peer leaves, unbinds, the link is dropped or
/// the simulator shuts down.
pub(super) async fn serve(
    shared: Arc<Shared>,
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let link = CancellationToken::new();
    shared.register(id, outbound_tx.clone(), link.clone());
    let (config_generation, config) = shared.config();
    tracing::debug!(connection = id, %peer, "simulated carrier accepted a connection");

    let mut session = Session {
        id,
        peer,
        shared: Arc::clone(&shared),
        framed: Framed::new(stream, CommandCodec::new()),
        outbound_tx,
        outbound_rx,
        bind: None,
        next_sequence: 1,
        v50: false,
        unacked: BTreeMap::new(),
        config,
        config_generation,
    };
    let end = session.run(&shutdown, &link).await;

    shared.unregister(id);
    session.redeliver_unacked();
    if let Some(kind) = session.bind.take() {
        shared.counters.bound.fetch_sub(1, Ordering::Relaxed);
        kind.counter(&shared.counters)
            .fetch_sub(1, Ordering::Relaxed);
    }
    // Receipts and MOs queued here but never written go to the next receiver that binds.
    session.outbound_rx.close();
    let mut unsent = Vec::new();
    while let Ok(pdu) = session.outbound_rx.try_recv() {
        unsent.push(pdu);
    }
    shared.park_all(unsent);
    match end {
        End::LinkDropped | End::Shutdown | End::BindRefused | End::Unbound => {
            tracing::info!(connection = id, %peer, reason = ?end, "simulated carrier closed the connection");
        }
        End::PeerClosed | End::DecodeError | End::WriteFailed => {
            tracing::info!(connection = id, %peer, reason = ?end, "simulated carrier lost the connection");
        }
    }
}

struct Session {
    id: u64,
    peer: SocketAddr,
    shared: Arc<Shared>,
    framed: Framed<Box<dyn Stream>, CommandCodec>,
    /// Our own queue's sender, handed to receipt timers when this session can receive.
    outbound_tx: mpsc::Sender<DeliverSm>,
    outbound_rx: mpsc::Receiver<DeliverSm>,
    bind: Option<BindKind>,
    /// Sequence number of the next PDU this side originates.
    next_sequence: u32,
    /// Bound with interface_version 5.0: may be sent 5.0 TLVs such as congestion_state.
    v50: bool,
    /// deliver_sm written but not answered, by sequence number: a store-and-forward SMSC sends
    /// them again when the link drops or the ESME answers with an error.
    unacked: BTreeMap<u32, DeliverSm>,
    config: Arc<SimConfig>,
    config_generation: u64,
}

impl Session {
    async fn run(&mut self, shutdown: &CancellationToken, link: &CancellationToken) -> End {
        loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = link.cancelled() => return End::LinkDropped,
                frame = self.framed.next() => Event::Inbound(frame),
                Some(pdu) = self.outbound_rx.recv() => Event::Outbound(pdu),
            };
            let mut flow = self.on_event(event).await;
            // Handle what is already here before paying for one flush.
            for _ in 0..BATCH {
                if flow != Flow::Continue {
                    break;
                }
                if let Some(frame) = self.framed.next().now_or_never() {
                    flow = self.on_event(Event::Inbound(frame)).await;
                } else if let Ok(pdu) = self.outbound_rx.try_recv() {
                    flow = self.on_event(Event::Outbound(pdu)).await;
                } else {
                    break;
                }
            }
            if flow != Flow::Close(End::WriteFailed)
                && let Err(err) = SinkExt::<Command>::flush(&mut self.framed).await
            {
                tracing::debug!(connection = self.id, %err, "simulated carrier: flush failed");
                return End::WriteFailed;
            }
            if let Flow::Close(end) = flow {
                return end;
            }
        }
    }

    async fn on_event(&mut self, event: Event) -> Flow {
        let result = match event {
            Event::Inbound(None) => return Flow::Close(End::PeerClosed),
            Event::Inbound(Some(Err(err))) => {
                tracing::warn!(connection = self.id, peer = %self.peer, %err,
                    "simulated carrier: undecodable PDU, closing the connection");
                return Flow::Close(End::DecodeError);
            }
            Event::Inbound(Some(Ok(command))) => self.on_command(command).await,
            Event::Outbound(pdu) => self.write_deliver_sm(pdu).await.map(|()| Flow::Continue),
        };
        result.unwrap_or_else(|err| {
            tracing::debug!(connection = self.id, %err, "simulated carrier: write failed");
            Flow::Close(End::WriteFailed)
        })
    }

    async fn on_command(&mut self, command: Command) -> Result<Flow, EncodeError> {
        let (id, status, sequence, pdu) = command.into_parts().raw();
        tracing::debug!(connection = self.id, command = ?id, ?status, sequence, "simulated carrier received");
        if self.bind.is_some() && self.silent() {
            // A hung SMSC: reads everything, answers nothing.
            return Ok(Flow::Continue);
        }
        match pdu {
            Some(Pdu::BindTransmitter(bind)) => {
                self.on_bind(
                    BindKind::Transmitter,
                    sequence,
                    &bind.system_id,
                    &bind.password,
                    bind.interface_version,
                )
                .await
            }
            Some(Pdu::BindReceiver(bind)) => {
                self.on_bind(
                    BindKind::Receiver,
                    sequence,
                    &bind.system_id,
                    &bind.password,
                    bind.interface_version,
                )
                .await
            }
            Some(Pdu::BindTransceiver(bind)) => {
                self.on_bind(
                    BindKind::Transceiver,
                    sequence,
                    &bind.system_id,
                    &bind.password,
                    bind.interface_version,
                )
                .await
            }
            Some(Pdu::SubmitSm(submit)) => self.on_submit(sequence, submit).await,
            Some(Pdu::QuerySm(query)) => self.on_query(sequence, &query).await,
            Some(Pdu::EnquireLink) => {
                self.respond(CommandStatus::EsmeRok, sequence, Pdu::EnquireLinkResp)
                    .await?;
                Ok(Flow::Continue)
            }
            Some(Pdu::Unbind) => {
                self.respond(CommandStatus::EsmeRok, sequence, Pdu::UnbindResp)
                    .await?;
                if let Some(kind) = self.bind.take() {
                    self.shared.counters.bound.fetch_sub(1, Ordering::Relaxed);
                    kind.counter(&self.shared.counters)
                        .fetch_sub(1, Ordering::Relaxed);
                    tracing::info!(connection = self.id, peer = %self.peer, ?kind, "simulated carrier: ESME unbound");
                }
                Ok(Flow::Close(End::Unbound))
            }
            _ if id == CommandId::DeliverSmResp => {
                self.shared
                    .counters
                    .deliver_resps
                    .fetch_add(1, Ordering::Relaxed);
                self.on_deliver_sm_resp(sequence, status);
                Ok(Flow::Continue)
            }
            // generic_nack and every other response (enquire_link_resp, unbind_resp, …) need no
            // answer; nacking a response would start a nack loop.
            _ if id == CommandId::GenericNack || id.is_response() => Ok(Flow::Continue),
            _ => {
                // SMPP 3.4 §3.3: an unsupported command gets generic_nack ESME_RINVCMDID.
                self.respond(CommandStatus::EsmeRinvcmdid, sequence, Pdu::GenericNack)
                    .await?;
                Ok(Flow::Continue)
            }
        }
    }

    async fn on_bind(
        &mut self,
        kind: BindKind,
        sequence: u32,
        system_id: &COctetString<1, 16>,
        password: &COctetString<1, 9>,
        interface_version: InterfaceVersion,
    ) -> Result<Flow, EncodeError> {
        self.shared
            .counters
            .bind_attempts
            .fetch_add(1, Ordering::Relaxed);
        self.refresh_config();
        if self.bind.is_some() {
            let response = kind.response(COctetString::null(), None);
            self.respond(CommandStatus::EsmeRalybnd, sequence, response)
                .await?;
            return Ok(Flow::Continue);
        }
        if system_id.as_str() != self.config.system_id || password.as_str() != self.config.password
        {
            tracing::info!(connection = self.id, peer = %self.peer, ?kind, system_id = system_id.as_str(),
                "simulated carrier refused a bind: bad credentials");
            let response = kind.response(COctetString::null(), None);
            self.respond(CommandStatus::EsmeRinvpaswd, sequence, response)
                .await?;
            return Ok(Flow::Close(End::BindRefused));
        }
        self.bind = Some(kind);
        self.shared.counters.bound.fetch_add(1, Ordering::Relaxed);
        kind.counter(&self.shared.counters)
            .fetch_add(1, Ordering::Relaxed);
        self.v50 = u8::from(interface_version) >= 0x50;
        if self.v50 {
            self.shared
                .counters
                .binds_v50
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(connection = self.id, peer = %self.peer, ?kind, system_id = system_id.as_str(),
            version = u8::from(interface_version), "simulated carrier bound an ESME");
        // A pre-3.4 ESME must not receive TLVs (SMPP 3.4 §3.4), so only 3.4+ gets
        // sc_interface_version: the highest version both sides speak.
        let version = match u8::from(interface_version) {
            0x50.. => Some(InterfaceVersion::Smpp5_0),
            0x34.. => Some(InterfaceVersion::Smpp3_4),
            _ => None,
        };
        let our_id =
            COctetString::from_str(&self.config.system_id).unwrap_or_else(|_| COctetString::null());
        self.respond(
            CommandStatus::EsmeRok,
            sequence,
            kind.response(our_id, version),
        )
        .await?;
        if kind.can_receive() {
            let parked = self.shared.start_receiving(self.id);
            if !parked.is_empty() {
                tracing::debug!(
                    connection = self.id,
                    count = parked.len(),
                    "simulated carrier: flushing parked deliver_sm"
                );
            }
            let mut parked = parked.into_iter();
            while let Some(pdu) = parked.next() {
                if let Err(err) = self.write_deliver_sm(pdu).await {
                    self.shared.park_all(parked);
                    return Err(err);
                }
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_submit(&mut self, sequence: u32, submit: SubmitSm) -> Result<Flow, EncodeError> {
        if !self.bind.is_some_and(BindKind::can_submit) {
            self.respond(
                CommandStatus::EsmeRinvbndsts,
                sequence,
                SubmitSmResp::default(),
            )
            .await?;
            return Ok(Flow::Continue);
        }
        self.refresh_config();
        let config = Arc::clone(&self.config);
        if let Some(limit) = config.throttle_above_per_second
            && self.shared.throttle.over_limit(limit)
        {
            self.shared
                .counters
                .throttled
                .fetch_add(1, Ordering::Relaxed);
            self.respond(
                CommandStatus::EsmeRthrottled,
                sequence,
                SubmitSmResp::default(),
            )
            .await?;
            return Ok(Flow::Continue);
        }
        if config.reject_ratio > 0.0 && rand::random::<f64>() < config.reject_ratio {
            self.respond(
                CommandStatus::EsmeRsubmitfail,
                sequence,
                SubmitSmResp::default(),
            )
            .await?;
            return Ok(Flow::Continue);
        }

        let number = self.shared.next_message_id.fetch_add(1, Ordering::Relaxed);
        let message_id = config.response_ids.write(number);
        let outcome = if config.undeliverable_ratio > 0.0
            && rand::random::<f64>() < config.undeliverable_ratio
        {
            Outcome::Undeliverable
        } else {
            Outcome::Delivered
        };
        let final_at = std::time::Instant::now() + config.receipt_delay;
        self.shared.record_outcome(number, outcome, final_at);
        let registered_delivery = u8::from(submit.registered_delivery);
        let record = SubmittedPdu {
            message_id: message_id.clone(),
            source_addr: submit.source_addr.as_str().to_owned(),
            destination_addr: submit.destination_addr.as_str().to_owned(),
            esm_class: u8::from(submit.esm_class),
            data_coding: u8::from(submit.data_coding),
            registered_delivery,
            short_message: message_body(&submit),
            validity_period: submit.validity_period.as_str().to_owned(),
            connection: self.id,
            sar: sar_tlvs(&submit),
        };
        self.shared.record_submitted(record);
        let mut response = SubmitSmResp::builder()
            .message_id(
                COctetString::from_str(&message_id).unwrap_or_else(|_| COctetString::null()),
            )
            .build();
        if self.v50
            && let Some(state) = config.congestion_state
        {
            response.push_tlv(congestion_state(state));
        }

        if !(config.receipts && outcome.requested_by(registered_delivery)) {
            self.respond(CommandStatus::EsmeRok, sequence, response)
                .await?;
            return Ok(Flow::Continue);
        }
        let job = ReceiptJob {
            // Carrier quirk (DOMAIN.md §3.5 quirk 1): the receipt may write it another way.
            message_id: config.receipt_ids.format(config.response_ids).write(number),
            outcome,
            source: (
                submit.source_addr_ton,
                submit.source_addr_npi,
                submit.source_addr,
            ),
            destination: (
                submit.dest_addr_ton,
                submit.dest_addr_npi,
                submit.destination_addr,
            ),
            submitted_at: OffsetDateTime::now_utc(),
            tlvs: config.receipt_tlvs,
        };
        let receives = self.bind.is_some_and(BindKind::can_receive);
        if config.receipt_before_response {
            // Carrier quirk (DOMAIN.md §3.5 quirk 3): the receipt overtakes the response.
            let receipt = job.to_deliver_sm(OffsetDateTime::now_utc());
            if receives {
                self.write_deliver_sm(receipt).await?;
            } else if let Err(receipt) = self.shared.try_deliver(receipt) {
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move { shared.deliver(None, *receipt).await });
            }
            self.respond(CommandStatus::EsmeRok, sequence, response)
                .await?;
        } else {
            self.respond(CommandStatus::EsmeRok, sequence, response)
                .await?;
            let preferred = receives.then(|| self.outbound_tx.clone());
            let shared = Arc::clone(&self.shared);
            let delay = config.receipt_delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let receipt = job.to_deliver_sm(OffsetDateTime::now_utc());
                shared.deliver(preferred, receipt).await;
            });
        }
        Ok(Flow::Continue)
    }

    /// query_sm: the state of a message this simulator accepted (its final state once the
    /// receipt is due, whether or not receipts are sent), or ESME_RQUERYFAIL for an id it
    /// never gave.
    async fn on_query(&mut self, sequence: u32, query: &QuerySm) -> Result<Flow, EncodeError> {
        if !self.bind.is_some_and(BindKind::can_submit) {
            self.respond(
                CommandStatus::EsmeRinvbndsts,
                sequence,
                QuerySmResp::default(),
            )
            .await?;
            return Ok(Flow::Continue);
        }
        self.refresh_config();
        self.shared.counters.queries.fetch_add(1, Ordering::Relaxed);
        let state = self
            .config
            .response_ids
            .read(query.message_id.as_str())
            .and_then(|id| self.shared.message_state(id));
        let Some(state) = state else {
            self.respond(
                CommandStatus::EsmeRqueryfail,
                sequence,
                QuerySmResp::default(),
            )
            .await?;
            return Ok(Flow::Continue);
        };
        let error_code = u8::from(state == MessageState::Undeliverable);
        let response = QuerySmResp::builder()
            .message_id(query.message_id.clone())
            .message_state(state)
            .error_code(error_code)
            .build();
        self.respond(CommandStatus::EsmeRok, sequence, response)
            .await?;
        Ok(Flow::Continue)
    }

    /// Set to answer nothing after the bind (`SimConfig::silent`).
    fn silent(&mut self) -> bool {
        self.refresh_config();
        self.config.silent
    }

    /// An answered deliver_sm is done; one answered with an error is sent again a little later
    /// (on any receiving session), as a store-and-forward SMSC retries.
    fn on_deliver_sm_resp(&mut self, sequence: u32, status: CommandStatus) {
        let Some(pdu) = self.unacked.remove(&sequence) else {
            return;
        };
        if status == CommandStatus::EsmeRok {
            return;
        }
        tracing::debug!(
            connection = self.id,
            sequence,
            ?status,
            "simulated carrier: deliver_sm refused, sending it again later"
        );
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep(REDELIVER_AFTER).await;
            shared.deliver(None, pdu).await;
        });
    }

    /// The link is gone: what it never acknowledged goes to another receiving session, or waits
    /// for the next one that binds. Called after `unregister`, so never back to this session.
    fn redeliver_unacked(&mut self) {
        let unacked = std::mem::take(&mut self.unacked);
        if unacked.is_empty() {
            return;
        }
        tracing::debug!(
            connection = self.id,
            count = unacked.len(),
            "simulated carrier: redelivering unacknowledged deliver_sm"
        );
        for pdu in unacked.into_values() {
            if let Err(pdu) = self.shared.try_deliver(pdu) {
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move { shared.deliver(None, *pdu).await });
            }
        }
    }

    /// Picks up a config replaced by `SimHandle::set_config` (one atomic load when unchanged).
    fn refresh_config(&mut self) {
        if self.shared.config_generation.load(Ordering::Acquire) != self.config_generation {
            (self.config_generation, self.config) = self.shared.config();
        }
    }

    async fn respond(
        &mut self,
        status: CommandStatus,
        sequence: u32,
        pdu: impl Into<Pdu>,
    ) -> Result<(), EncodeError> {
        let command = Command::new(status, sequence, pdu);
        tracing::debug!(connection = self.id, command = ?command.id(), ?status, sequence, "simulated carrier sent");
        self.framed.feed(command).await
    }

    async fn write_deliver_sm(&mut self, pdu: DeliverSm) -> Result<(), EncodeError> {
        let sequence = self.next_sequence;
        self.next_sequence = if sequence >= MAX_SEQUENCE {
            1
        } else {
            sequence + 1
        };
        tracing::debug!(
            connection = self.id,
            sequence,
            esm_class = u8::from(pdu.esm_class),
            "simulated carrier sent deliver_sm"
        );
        if self.unacked.len() < UNACKED_CAPACITY {
            self.unacked.insert(sequence, pdu.clone());
        }
        self.framed
            .feed(Command::new(CommandStatus::EsmeRok, sequence, pdu))
            .await?;
        self.shared
            .counters
            .deliver_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The SAR TLVs of a submit_sm, when all three are there.
fn sar_tlvs(submit: &SubmitSm) -> Option<(u16, u8, u8)> {
    let (mut reference, mut total, mut seqnum) = (None, None, None);
    for tlv in submit.tlvs() {
        match tlv.value() {
            Some(TlvValue::SarMsgRefNum(v)) => reference = Some(*v),
            Some(TlvValue::SarTotalSegments(v)) => total = Some(*v),
            Some(TlvValue::SarSegmentSeqnum(v)) => seqnum = Some(*v),
            _ => {}
        }
    }
    Some((reference?, total?, seqnum?))
}

/// The SMPP 5.0 congestion_state TLV (0x0428, one octet). rusmpp 0.4 lists it for no response
/// PDU, so it goes as a raw TLV with its tag.
fn congestion_state(state: u8) -> rusmpp::tlvs::MessageSubmissionResponseTlvValue {
    rusmpp::tlvs::MessageSubmissionResponseTlvValue::Other {
        tag: rusmpp::tlvs::TlvTag::CongestionState,
        value: rusmpp::types::AnyOctetString::from_vec(vec![state]),
    }
}

/// The message bytes of a submit_sm: `short_message`, or the message_payload TLV when
/// `short_message` is empty (SMPP 3.4 §5.3.2.32: they are mutually exclusive).
fn message_body(submit: &SubmitSm) -> Vec<u8> {
    let short_message = submit.short_message().as_ref();
    if !short_message.is_empty() {
        return short_message.to_vec();
    }
    submit
        .tlvs()
        .iter()
        .find_map(|tlv| match tlv.value() {
            Some(TlvValue::MessagePayload(payload)) => Some(payload.value.as_ref().to_vec()),
            _ => None,
        })
        .unwrap_or_default()
}
