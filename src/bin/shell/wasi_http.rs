//! A small blocking wasi:http client, shared by both components' shells
//! (included with `#[path]`: it is I/O, so it stays out of the core
//! library). Unlike a client that fails the exchange when the request body
//! stream is closed, it treats a closed body stream as "the server stopped
//! reading" and still reads the response: a server may answer (and close)
//! before the end of an empty or unwanted body has gone out.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

/// An HTTP exchange's outcome: status and body.
pub type Exchange = Result<(u16, Vec<u8>), String>;

fn method(name: &str) -> Method {
    match name {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_owned()),
    }
}

pub use snapsign::presign::redact_query;

/// Sends `method url` with `headers` and `body`; waits for the whole response.
/// Errors name the URL without its query.
pub fn send(method_name: &str, url: &str, headers: &[(String, String)], body: &[u8]) -> Exchange {
    let parsed = url::Url::parse(url).map_err(|e| format!("{} is not a URL: {e}", redact_query(url)))?;
    // From here on `url` only names the request in errors.
    let shown = redact_query(url);
    let url = shown.as_str();
    let scheme = match parsed.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("{url}: scheme {other} is not http or https")),
    };
    let authority = snapsign::presign::url_authority(&parsed).ok_or_else(|| format!("{url} has no host"))?;
    let path = match parsed.query() {
        Some(query) => format!("{}?{query}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let mut fields: Vec<(String, Vec<u8>)> =
        headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
    fields.push(("content-length".into(), body.len().to_string().into_bytes()));
    let fields = Fields::from_list(&fields).map_err(|e| format!("{url}: bad header: {e:?}"))?;
    let request = OutgoingRequest::new(fields);
    let invalid = |what: &str| format!("{url}: invalid {what}");
    request.set_method(&method(method_name)).map_err(|()| invalid("method"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| invalid("scheme"))?;
    request.set_authority(Some(&authority)).map_err(|()| invalid("authority"))?;
    request.set_path_with_query(Some(&path)).map_err(|()| invalid("path"))?;
    let outgoing = request.body().map_err(|()| format!("{url}: request body taken twice"))?;
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("{url}: {e:?}"))?;
    {
        let stream = outgoing.write().map_err(|()| format!("{url}: request body stream taken twice"))?;
        for chunk in body.chunks(4096) {
            match stream.blocking_write_and_flush(chunk) {
                Ok(()) => {}
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("{url}: sending the body: {}", e.to_debug_string()));
                }
            }
        }
    }
    // The server may have answered already and closed the body: the response decides.
    let _ = OutgoingBody::finish(outgoing, None);
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("{url}: {code:?}")),
        Some(Err(())) | None => return Err(format!("{url}: response already taken")),
    };
    let status = response.status();
    let incoming = response.consume().map_err(|()| format!("{url}: response body taken twice"))?;
    let mut bytes = Vec::new();
    {
        let stream = incoming.stream().map_err(|()| format!("{url}: response body stream taken twice"))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("{url}: reading the response: {}", e.to_debug_string()));
                }
            }
        }
    }
    drop(incoming);
    Ok((status, bytes))
}
