//! The way to a backend's writer: an operation goes in, its answer comes back once committed.

use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::domain::{Job, Op, Reply};

/// What a backend's writer receives: work, or the order to stop once the work sent before it
/// is committed.
pub(crate) enum Message {
    Job(Job),
    Stop,
}

/// A handle on a backend's writer (SQLite: its thread; PostgreSQL: its pool of transactions).
pub struct Writer {
    jobs: mpsc::Sender<Message>,
}

impl Writer {
    pub(crate) fn new(capacity: usize) -> (Writer, mpsc::Receiver<Message>) {
        let (jobs, receiver) = mpsc::channel(capacity);
        (Writer { jobs }, receiver)
    }

    /// Applies `op` and waits for its commit.
    pub(crate) async fn call(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Message::Job(Job { op, reply }))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn count(&self, op: Op) -> Result<u64, StoreError> {
        match self.call(op).await? {
            Reply::Count(n) => Ok(n),
            other => Err(other.unexpected()),
        }
    }

    /// Asks `stoppers` writers to stop behind the work already sent.
    pub(crate) async fn stop(&self, stoppers: usize) {
        for _ in 0..stoppers {
            let _ = self.jobs.send(Message::Stop).await;
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }
}
