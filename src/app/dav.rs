//! The WebDAV methods sccache's storage layer (OpenDAL) sends on the generic
//! route, `/v1/artifacts/{namespace}/...`, besides GET and PUT.
//!
//! sluice has no directories: a key's `/`-separated segments are one flat
//! name in the store. So every collection exists:
//!
//! - `PROPFIND` on the namespace's root or on a path ending in `/` answers
//!   `207 Multi-Status` with that one collection (`resourcetype` collection,
//!   `getlastmodified` now). OpenDAL walks up from a key's parent with
//!   `PROPFIND Depth: 0` before a write and stops at the first collection it
//!   finds, so a write costs one PROPFIND and never a `MKCOL`. On a key it
//!   answers 207 with the artifact (length, ETag, write time) or 404.
//!   Members are never listed, whatever `Depth` says, and the request body
//!   (OpenDAL's `allprop`) is read and not parsed: the answer carries every
//!   property sluice has.
//! - `MKCOL` answers `201 Created` (a body: 415, as RFC 4918 says).
//!
//! Both need the token a GET (PROPFIND) or a PUT (MKCOL) of the namespace
//! would need.

use super::{close_if_unread, App, Decision, Defer, PutSink, Reply, RequestInfo};
use crate::auth::Access;
use crate::http1::imf_fixdate;
use crate::route::DavMethod;
use crate::store::OpenCache;
use crate::store::StoreError;

/// Largest PROPFIND body read (and thrown away), bytes.
pub const PROPFIND_BODY_BYTES_MAX: u64 = 64 * 1024;

impl App {
    /// `PROPFIND` or `MKCOL` on `path` (after `{namespace}/`) of `ns`.
    pub(super) fn dav(
        &self,
        req: &RequestInfo<'_>,
        ns: &str,
        path: &str,
        method: DavMethod,
        files: Option<&mut OpenCache>,
    ) -> Decision {
        let has_body = req.has_body();
        let done = |reply: Reply| Decision::Reply(close_if_unread(reply, has_body));
        let reply = match method {
            DavMethod::Mkcol => {
                if let Err(reply) = self.authorize(req, ns, Access::Write) {
                    return done(reply);
                }
                if has_body {
                    return done(Reply::error(415, "MKCOL takes no body"));
                }
                Reply::empty(201)
            }
            DavMethod::Propfind => {
                if let Err(reply) = self.authorize(req, ns, Access::Read) {
                    return done(reply);
                }
                let now_secs = crate::store::now_ms() / 1000;
                if path.is_empty() || path.ends_with('/') {
                    multistatus(req.path, Resource::Collection, now_secs)
                } else {
                    let found = match files {
                        Some(cache) => self.store.get_cached(ns, path, cache),
                        None => self.store.get(ns, path),
                    };
                    match found {
                        Ok(Some(artifact)) => {
                            let written = artifact.write_time_ms().unwrap_or(0) / 1000;
                            let resource = Resource::File {
                                len: artifact.len,
                                etag: artifact.etag(),
                            };
                            multistatus(req.path, resource, written)
                        }
                        Ok(None) => Reply::error(404, "no such artifact"),
                        Err(StoreError::WouldBlock) => return Defer::Cold.decision(ns, path),
                        Err(err) => crate::exchange::store_error(&err),
                    }
                }
            }
        };
        if has_body && reply.status < 400 {
            // OpenDAL sends an `allprop` body with every PROPFIND: read it,
            // so the connection stays open for the PUT that follows.
            return Decision::ReceiveBody(PutSink::discarding(reply, PROPFIND_BODY_BYTES_MAX));
        }
        done(reply)
    }
}

enum Resource {
    Collection,
    File { len: u64, etag: String },
}

/// A `207 Multi-Status` with one response for `href`.
fn multistatus(href: &str, resource: Resource, modified_secs: u64) -> Reply {
    let props = match resource {
        Resource::Collection => "<D:resourcetype><D:collection/></D:resourcetype>".to_string(),
        Resource::File { len, etag } => format!(
            "<D:resourcetype/><D:getcontentlength>{len}</D:getcontentlength>\
             <D:getetag>{}</D:getetag>",
            xml_escape(&etag)
        ),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
         <D:multistatus xmlns:D=\"DAV:\"><D:response><D:href>{}</D:href>\
         <D:propstat><D:prop><D:getlastmodified>{}</D:getlastmodified>{props}</D:prop>\
         <D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>",
        xml_escape(href),
        imf_fixdate(modified_secs),
    );
    let mut r = Reply::text(207, body);
    r.headers[0].1 = "application/xml; charset=\"utf-8\"".to_string();
    r
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::ReplyBody;

    #[test]
    fn multistatus_has_what_opendal_reads() {
        let r = multistatus("/v1/artifacts/sccache/1/7/8/", Resource::Collection, 0);
        assert_eq!(r.status, 207);
        let ReplyBody::Bytes(body) = &r.body else {
            panic!("no body")
        };
        let text = String::from_utf8_lossy(body);
        for part in [
            "<D:href>/v1/artifacts/sccache/1/7/8/</D:href>",
            "<D:getlastmodified>Thu, 01 Jan 1970 00:00:00 GMT</D:getlastmodified>",
            "<D:collection/>",
            "<D:status>HTTP/1.1 200 OK</D:status>",
        ] {
            assert!(text.contains(part), "{part} missing in {text}");
        }
        let file = multistatus(
            "/v1/artifacts/s/k",
            Resource::File {
                len: 5,
                etag: "\"ab\"".to_string(),
            },
            0,
        );
        let ReplyBody::Bytes(body) = &file.body else {
            panic!("no body")
        };
        let text = String::from_utf8_lossy(body);
        assert!(text.contains("<D:resourcetype/><D:getcontentlength>5</D:getcontentlength><D:getetag>&quot;ab&quot;</D:getetag>"), "{text}");
    }
}
