//! Nx's self-hosted remote cache API: `GET` / `PUT /v1/cache/{hash}` in the
//! namespace [`NX_NAMESPACE`].
//!
//! Nx (24) is strict about statuses, and any other answer fails the user's
//! task: a GET must be 200 or 404; a PUT 200 when stored, 409 when the hash
//! is already there (write once, as the API says), 403 for a token that may
//! not write (Nx then goes on silently); a 401 must carry
//! `Content-Type: text/plain` with no parameter. 201 or 204 would make Nx
//! retry the upload six times and then fail the task, so a stored PUT is
//! reshaped to 200. A PUT without `Content-Length` answers 411.

use super::{close_if_unread, App, Decision, Defer, Reply, RequestInfo};
use crate::auth::Access;
use crate::route::{Action, ArtifactKind, NX_NAMESPACE};
use crate::store::format::Meta;
use crate::store::{OpenCache, StoreError};

impl App {
    /// A request under `/v1/cache/`.
    pub(super) fn nx(
        &self,
        req: &RequestInfo<'_>,
        hash: &str,
        action: Action,
        files: Option<&mut OpenCache>,
    ) -> Decision {
        let has_body = req.has_body();
        let done = |reply: Reply| Decision::Reply(close_if_unread(plain_error(reply), has_body));
        match action {
            Action::Put => {
                let refuse = |reply: Reply| {
                    self.metrics.count_put_aborted();
                    done(reply)
                };
                if let Err(reply) = self.authorize(req, NX_NAMESPACE, Access::Write) {
                    return refuse(reply);
                }
                if req.content_length.is_none() {
                    return refuse(Reply::error(411, "a PUT needs Content-Length"));
                }
                let existing = match files {
                    Some(cache) => self.store.get_cached(NX_NAMESPACE, hash, cache),
                    None => self.store.get(NX_NAMESPACE, hash),
                };
                match existing {
                    Ok(Some(_)) => {
                        return refuse(Reply::error(409, "this hash is already stored"));
                    }
                    Ok(None) => {}
                    // The ring opens the file off its thread and asks again.
                    Err(StoreError::WouldBlock) => return Defer::Cold.decision(NX_NAMESPACE, hash),
                    Err(err) => return refuse(crate::exchange::store_error(&err)),
                }
                match self.put(req, ArtifactKind::Nx, NX_NAMESPACE, hash, Meta::default()) {
                    Decision::ReceiveBody(mut sink) => {
                        sink.set_reshape(reshape_put);
                        Decision::ReceiveBody(sink)
                    }
                    Decision::Reply(reply) => Decision::Reply(plain_error(reply)),
                    other => other,
                }
            }
            _ => match self.get(req, ArtifactKind::Nx, NX_NAMESPACE, hash, files) {
                Ok(reply) if req.method == "HEAD" => done(reply.without_body()),
                Ok(reply) => done(reply),
                Err(defer) => defer.decision(NX_NAMESPACE, hash),
            },
        }
    }
}

/// A stored PUT answers exactly 200 (201 and 204 make Nx retry and fail).
fn reshape_put(mut reply: Reply) -> Reply {
    match reply.status {
        201 | 204 => {
            reply.status = 200;
            reply.content_length = Some(0);
            reply
        }
        _ => plain_error(reply),
    }
}

/// Error replies say `Content-Type: text/plain` with no parameter: Nx
/// refuses a 401 with any other value, `charset` included.
fn plain_error(mut reply: Reply) -> Reply {
    if reply.status >= 400 {
        for (name, value) in &mut reply.headers {
            if *name == "content-type" {
                *value = "text/plain".to_string();
            }
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_nx_accepts() {
        assert_eq!(reshape_put(Reply::empty(201)).status, 200);
        let replaced = reshape_put(Reply::empty(204));
        assert_eq!((replaced.status, replaced.content_length), (200, Some(0)));
        let r = plain_error(Reply::error(401, "token"));
        assert_eq!(r.headers[0], ("content-type", "text/plain".to_string()));
        let ok = plain_error(Reply::text(200, "x"));
        assert_eq!(ok.headers[0].1, "text/plain; charset=utf-8");
    }
}
