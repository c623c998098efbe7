//! Request-line variants that Azure treats as the same route, folded into one form before routing
//! so that every route accepts them alike: a trailing `/` on the path (Node `azure-iothub`'s
//! `Registry.list` always sends `GET /devices/?api-version=...`) and query parameter names in any
//! case (`API-Version=`). Ids stay percent-encoded here; the path extractor decodes them, `%2F` and
//! `%3A` included. Runs before routing and before any authorization.

use axum::http::{Request, Uri};

/// Query parameters the routes read, by their canonical name.
const KNOWN_PARAMS: [&str; 4] = ["api-version", "top", "after", "run"];

/// The request with its path and query in canonical form; anything unparsable is left as it was,
/// for the router to refuse.
pub fn request<B>(mut req: Request<B>) -> Request<B> {
    if let Some(uri) = canonical(req.uri()) {
        *req.uri_mut() = uri;
    }
    req
}

fn canonical(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let trimmed = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let query = uri.query().map(canonical_query);
    if trimmed == path && query.as_deref() == uri.query() {
        return None;
    }
    let path_and_query = match query {
        Some(q) => format!("{trimmed}?{q}"),
        None => trimmed.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

fn canonical_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (name, rest) = pair.split_once('=').map_or((pair, None), |(n, v)| (n, Some(v)));
            let name = KNOWN_PARAMS.iter().find(|k| k.eq_ignore_ascii_case(name)).copied().unwrap_or(name);
            match rest {
                Some(v) => format!("{name}={v}"),
                None => name.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        canonical(&s.parse().unwrap()).map_or_else(|| s.to_owned(), |u| u.to_string())
    }

    #[test]
    fn folds_the_variants_azure_accepts() {
        assert_eq!(norm("/devices/?api-version=2021-04-12"), "/devices?api-version=2021-04-12");
        assert_eq!(norm("/devices?API-VERSION=2021-04-12&Top=5"), "/devices?api-version=2021-04-12&top=5");
        assert_eq!(norm("/twins/d%3A1/"), "/twins/d%3A1");
        assert_eq!(norm("/"), "/");
        assert_eq!(norm("/devices/a%2Fb?api-version=1"), "/devices/a%2Fb?api-version=1");
        // Parameters the routes do not read keep their spelling.
        assert_eq!(norm("/x?forceRegistration=true&api-Version=1"), "/x?forceRegistration=true&api-version=1");
    }
}
