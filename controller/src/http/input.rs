//! Extractors that refuse input a route does not take, so a request carrying what the route
//! would ignore (a query, a body) fails before it changes anything: a client that meant it
//! to count learns that it did not. Handlers take them as `Result`s and check them after
//! their path, so a bad name is named first, as on the routes with a body.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;

use super::ApiError;

/// The route takes no query parameters: any query string is a 400.
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        refuse_query(parts)
    }
}

fn refuse_query(parts: &Parts) -> Result<NoQuery, ApiError> {
    match parts.uri.query() {
        None | Some("") => Ok(NoQuery),
        Some(_) => Err(ApiError::bad_request(
            "this route takes no query parameters",
        )),
    }
}

/// The route takes neither a query nor a body: a body other than an empty one or `{}`
/// (which HTTP clients send by habit) is a 400.
pub struct NoInput;

impl<S: Send + Sync> FromRequest<S> for NoInput {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        refuse_query(&parts)?;
        NoBody::from_request(Request::from_parts(parts, body), state).await?;
        Ok(NoInput)
    }
}

/// The route takes no body (its input is in the query): a body other than an empty one or
/// `{}` is a 400.
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Within the body limit like any other (413 past it).
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_request"
            };
            ApiError::new(e.status(), code, e.body_text())
        })?;
        if confroute_shared::http_serve::says_nothing(&bytes) {
            Ok(NoBody)
        } else {
            Err(ApiError::bad_request(
                "this route takes no body: send none, or {}",
            ))
        }
    }
}
