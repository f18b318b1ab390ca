//! The client side: [`PoolControl`] over the daemon's socket.

use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::protocol::{receive, send, Reply, Request, MAX_PAYLOAD};
use crate::activate::control::{Activation, ControlStatus, PoolControl, ThinInfo};
use crate::activate::nbd::Listen;
use crate::error::{Error, Result};
use crate::units::ThinId;

/// A connection to a pool daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn lost(e: io::Error) -> Error {
    Error::Activation(format!("lost the connection to the pool daemon: {e}"))
}

impl Client {
    /// Connects to the daemon listening on `socket`. `Ok(None)` when none listens there (no
    /// socket, or one left behind by a daemon that died).
    pub fn connect(socket: &Path) -> Result<Option<Client>> {
        match UnixStream::connect(socket) {
            Ok(stream) => {
                let writer = stream.try_clone().map_err(lost)?;
                Ok(Some(Client {
                    reader: BufReader::new(stream),
                    writer,
                }))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::Activation(format!(
                "failed to reach the pool daemon at {}: {e}",
                socket.display()
            ))),
        }
    }

    fn call(&mut self, request: &Request, payload: &[u8]) -> Result<Reply> {
        let sent = send(&mut self.writer, request).and_then(|()| {
            if payload.is_empty() {
                Ok(())
            } else {
                io::Write::write_all(&mut self.writer, payload)
            }
        });
        if let Err(e) = sent {
            return Err(self.refusal().unwrap_or_else(|| lost(e)));
        }
        let reply: Reply = receive(&mut self.reader)
            .map_err(lost)?
            .ok_or_else(|| lost(io::ErrorKind::UnexpectedEof.into()))?;
        if reply.ok {
            return Ok(reply);
        }
        Err(match reply.error {
            Some(e) => Error::from(e),
            None => Error::Activation("the pool daemon failed without saying why".into()),
        })
    }

    /// The error a daemon sent before it closed this connection, if any: one serving as
    /// many clients as it may refuses more that way, and the request then finds the
    /// connection closed.
    fn refusal(&mut self) -> Option<Error> {
        let reply: Reply = receive(&mut self.reader).ok()??;
        reply.error.map(Error::from)
    }

    fn expect<T>(field: Option<T>, what: &str) -> Result<T> {
        field.ok_or_else(|| Error::Activation(format!("the pool daemon's reply lacks {what}")))
    }

    /// Asks the daemon to stop (see [`Request::Stop`]).
    pub fn stop(&mut self, force: bool) -> Result<()> {
        self.call(&Request::Stop { force }, &[]).map(drop)
    }

    /// Has the daemon serve thins over NBD at `listen` until this client is dropped; returns
    /// the exports as `1 (base), 2`.
    pub fn serve_nbd(
        &mut self,
        listen: &Listen,
        ids: &[ThinId],
        read_only: bool,
    ) -> Result<String> {
        let request = Request::ServeNbd {
            listen: listen.clone(),
            ids: ids.iter().map(|id| id.get()).collect(),
            read_only,
        };
        let reply = self.call(&request, &[])?;
        Self::expect(reply.exports, "the exports")
    }

    /// Reads up to [`MAX_PAYLOAD`] bytes at a time.
    fn read_chunk(&mut self, id: ThinId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let request = Request::Read {
            id: id.get(),
            offset,
            length: buf.len() as u64,
        };
        let reply = self.call(&request, &[])?;
        if reply.length != Some(buf.len() as u64) {
            return Err(Error::Activation(
                "the pool daemon sent a read reply of the wrong length".into(),
            ));
        }
        self.reader.read_exact(buf).map_err(lost)
    }
}

impl PoolControl for Client {
    fn status(&mut self) -> Result<ControlStatus> {
        let reply = self.call(&Request::Status, &[])?;
        Self::expect(reply.status, "a status")
    }

    fn list(&mut self) -> Result<Vec<ThinInfo>> {
        let reply = self.call(&Request::List, &[])?;
        Self::expect(reply.thins, "a list of thins")
    }

    fn create_thin(&mut self, id: ThinId, size_bytes: u64, name: Option<&str>) -> Result<()> {
        let request = Request::CreateThin {
            id: id.get(),
            size_bytes,
            name: name.map(str::to_owned),
        };
        self.call(&request, &[]).map(drop)
    }

    fn create_snap(&mut self, id: ThinId, origin: ThinId, name: Option<&str>) -> Result<()> {
        let request = Request::CreateSnap {
            id: id.get(),
            origin: origin.get(),
            name: name.map(str::to_owned),
        };
        self.call(&request, &[]).map(drop)
    }

    fn delete(&mut self, id: ThinId) -> Result<()> {
        self.call(&Request::Delete { id: id.get() }, &[]).map(drop)
    }

    fn rename(&mut self, id: ThinId, name: Option<&str>) -> Result<()> {
        let request = Request::Rename {
            id: id.get(),
            name: name.map(str::to_owned),
        };
        self.call(&request, &[]).map(drop)
    }

    fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        self.call(&Request::SetTransactionId { old, new }, &[])
            .map(drop)
    }

    fn reserve_metadata_snap(&mut self) -> Result<()> {
        self.call(&Request::ReserveMetadataSnap, &[]).map(drop)
    }

    fn release_metadata_snap(&mut self) -> Result<()> {
        self.call(&Request::ReleaseMetadataSnap, &[]).map(drop)
    }

    fn resize_pool(&mut self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()> {
        let request = Request::ResizePool {
            data_bytes,
            metadata_bytes,
        };
        self.call(&request, &[]).map(drop)
    }

    fn size_of(&mut self, id: ThinId) -> Result<u64> {
        let reply = self.call(&Request::SizeOf { id: id.get() }, &[])?;
        Self::expect(reply.size_bytes, "a size")
    }

    fn read(&mut self, id: ThinId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        for chunk in buf.chunks_mut(MAX_PAYLOAD as usize) {
            self.read_chunk(id, offset + done, chunk)?;
            done += chunk.len() as u64;
        }
        Ok(())
    }

    fn write(&mut self, id: ThinId, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0;
        for chunk in data.chunks(MAX_PAYLOAD as usize) {
            let request = Request::Write {
                id: id.get(),
                offset: offset + done,
                length: chunk.len() as u64,
            };
            self.call(&request, chunk)?;
            done += chunk.len() as u64;
        }
        Ok(())
    }

    fn discard(&mut self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        let request = Request::Discard {
            id: id.get(),
            offset,
            length: len,
        };
        self.call(&request, &[]).map(drop)
    }

    fn flush(&mut self) -> Result<()> {
        self.call(&Request::Flush, &[]).map(drop)
    }

    fn activate(&mut self, id: ThinId, read_only: bool) -> Result<Activation> {
        let request = Request::Activate {
            id: id.get(),
            read_only,
        };
        let reply = self.call(&request, &[])?;
        Self::expect(reply.activation, "an activation")
    }

    fn deactivate(&mut self, id: ThinId, deferred: bool) -> Result<()> {
        let request = Request::Deactivate {
            id: id.get(),
            deferred,
        };
        self.call(&request, &[]).map(drop)
    }
}
