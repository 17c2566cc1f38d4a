//! The fleet page's actions: `POST /ui/api/rollouts/{namespace}/{name}/{verb}` with
//! `Authorization: Bearer TOKEN`, for the verbs of [`crate::cmd::verb`].
//!
//! The page is read-only unless the request is authorised to act. Who the token is and whether
//! that user may act is never the page's or this hub's opinion:
//!
//! - on a cluster the API server answers both, as it does for kubectl: a `TokenReview` says who
//!   the token is (user and groups), a `SubjectAccessReview` whether that user may `patch`
//!   `firmwarerollouts` in the namespace (what `kubectl patch` of the rollout would need; the
//!   Role `flightnode-operator` grants it);
//! - on the local store a token file (`serve --ui-tokens FILE`, lines `token,user`, like the API
//!   server's static token file) names the users, and every user in it may act: the local store
//!   has no roles.
//!
//! No cookie is read or set: a browser only sends the token where the page's script puts it, so
//! another site cannot make a signed-in browser act (no CSRF). An allowed action runs
//! [`crate::cmd::verb::act`], the CLI's own code path, with the reviewed user name as the editor,
//! so the rollout's history names that user and the controller refuses what makes no sense the
//! same way it refuses the CLI.

use crate::cmd::verb::{Outcome, Verb, act};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;

/// How long an action waits for the controller to carry out a request before it answers 202.
const ACT_WAIT: Duration = Duration::from_secs(15);

/// The verb and resource the `SubjectAccessReview` asks about.
const REVIEW_VERB: &str = "patch";
const REVIEW_GROUP: &str = "edge.drone.io";
const REVIEW_RESOURCE: &str = "firmwarerollouts";

/// Who may act from the page, and where the actions are written.
#[derive(Clone, Default)]
pub enum Authority {
    /// Nothing can tell who a token is (local store without `--ui-tokens`): the page only reads.
    #[default]
    None,
    /// The local store: users by the SHA-256 of their token (the tokens themselves are not kept
    /// in memory, nor compared byte by byte), and a client of this hub's own HTTP API.
    Tokens {
        /// SHA-256 of the token → user name.
        users: HashMap<[u8; 32], String>,
        /// The hub's own Kubernetes-shaped HTTP API, where the CLI writes too.
        client: kube::Client,
    },
    /// A cluster: the API server reviews tokens and access; the hub writes with its own client.
    Kube(kube::Client),
}

impl Authority {
    /// Whether the page can act at all.
    pub fn can_act(&self) -> bool {
        !matches!(self, Authority::None)
    }
}

/// A token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("reading the UI token file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `token,user`.
    #[error(
        "UI token file {path} line {line}: expected `token,user` (a token, a comma, a user name; \
         further columns are ignored)"
    )]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// No token in it.
    #[error("UI token file {path} holds no token: add lines `token,user`")]
    Empty {
        /// The file.
        path: String,
    },
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Reads a token file: one `token,user` per line (further comma-separated columns, such as the
/// API server's uid and groups, are ignored), blank lines and `#` comments skipped.
pub fn read_token_file(path: &std::path::Path) -> Result<HashMap<[u8; 32], String>, TokenFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_tokens(&text, &shown)
}

fn parse_tokens(text: &str, path: &str) -> Result<HashMap<[u8; 32], String>, TokenFileError> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut cols = line.split(',').map(|c| c.trim().trim_matches('"'));
        match (cols.next(), cols.next()) {
            (Some(token), Some(user)) if !token.is_empty() && !user.is_empty() => {
                users.insert(digest(token), user.to_owned());
            }
            _ => {
                return Err(TokenFileError::Line {
                    path: path.to_owned(),
                    line: i + 1,
                });
            }
        }
    }
    if users.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(users)
}

/// Why a request may not act: the HTTP status and a sentence that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// 401, 403 or 503.
    pub status: StatusCode,
    /// What failed and what to do.
    pub message: String,
}

impl Denied {
    fn unauthenticated(message: impl Into<String>) -> Self {
        Denied {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
        }
    }
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Authority {
    /// The user `token` is, when that user may act on rollout `name` in `namespace`.
    pub async fn authorise(
        &self,
        token: Option<&str>,
        namespace: &str,
        name: &str,
    ) -> Result<String, Denied> {
        match self {
            Authority::None => Err(Denied::unauthenticated(
                "this hub's fleet page is read-only: it has no way to tell who a token is. Start \
                 the hub with --ui-tokens FILE (lines token,user) to let the users in it act, or \
                 use flightnode-hub rollout VERB",
            )),
            Authority::Tokens { users, .. } => {
                let token = token.ok_or_else(not_signed_in)?;
                users.get(&digest(token)).cloned().ok_or_else(|| {
                    Denied::unauthenticated(
                        "this token is not in the hub's --ui-tokens file: sign in again with a \
                         token from that file",
                    )
                })
            }
            Authority::Kube(client) => {
                kube_authorise(client, token.ok_or_else(not_signed_in)?, namespace, name).await
            }
        }
    }

    fn client(&self) -> Option<&kube::Client> {
        match self {
            Authority::None => None,
            Authority::Tokens { client, .. } | Authority::Kube(client) => Some(client),
        }
    }
}

fn not_signed_in() -> Denied {
    Denied::unauthenticated(
        "not signed in: the page acts only for a user it can name. Sign in with a bearer token \
         (on a cluster one the API server accepts, e.g. from `kubectl create token`; on a local \
         hub one from its --ui-tokens file)",
    )
}

/// TokenReview, then SubjectAccessReview for the user it names, both answered by the API server.
async fn kube_authorise(
    client: &kube::Client,
    token: &str,
    namespace: &str,
    name: &str,
) -> Result<String, Denied> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let unavailable = |what: &str, e: kube::Error| {
        tracing::warn!(error = %e, what, "the fleet page could not ask the API server");
        Denied {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the hub could not ask the API server {what} ({e}); check that the hub's service \
                 account may create tokenreviews and subjectaccessreviews (the ClusterRole \
                 flightnode-ui-reviewer in rbac.yaml), then try again"
            ),
        }
    };
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let reviews: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let reviewed = reviews
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| unavailable("who the token is", e))?;
    let status = reviewed.status.unwrap_or_default();
    let user = match (status.authenticated, status.user) {
        (Some(true), Some(user)) if user.username.as_deref().is_some_and(|u| !u.is_empty()) => user,
        _ => {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "unknown or expired token".into());
            return Err(Denied::unauthenticated(format!(
                "the API server does not accept this token ({why}): sign in again with a valid one"
            )));
        }
    };
    let username = user.username.clone().unwrap_or_default();
    let access = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(REVIEW_VERB.to_owned()),
                group: Some(REVIEW_GROUP.to_owned()),
                resource: Some(REVIEW_RESOURCE.to_owned()),
                name: Some(name.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviews: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let answered = reviews
        .create(&kube::api::PostParams::default(), &access)
        .await
        .map_err(|e| unavailable("what the user may do", e))?;
    let status = answered.status.unwrap_or_default();
    if status.allowed {
        return Ok(username);
    }
    let reason = status
        .reason
        .filter(|r| !r.is_empty())
        .or(status.evaluation_error)
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    Err(Denied {
        status: StatusCode::FORBIDDEN,
        message: format!(
            "user {username} may not {REVIEW_VERB} {REVIEW_RESOURCE} in namespace {namespace}{reason}: \
             ask a cluster admin to bind the Role flightnode-operator to you there \
             (kubectl create rolebinding NAME --role flightnode-operator --user {username} -n {namespace})"
        ),
    })
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"flightnode-hub\""),
        );
    }
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    answer(status, serde_json::json!({ "error": message }))
}

/// `POST /ui/api/rollouts/{namespace}/{name}/{verb}`.
pub async fn post(
    State(state): State<super::UiState>,
    Path((namespace, name, verb)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(verb) = Verb::parse(&verb) else {
        let known: Vec<&str> = Verb::ALL.iter().map(|v| v.name()).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("no verb {verb:?}: one of {}", known.join(", ")),
        );
    };
    let user = match state
        .authority
        .authorise(bearer(&headers), &namespace, &name)
        .await
    {
        Ok(user) => user,
        Err(denied) => {
            tracing::info!(%namespace, rollout = %name, verb = verb.name(), status = denied.status.as_u16(), "fleet page action refused");
            return error(denied.status, &denied.message);
        }
    };
    let Some(client) = state.authority.client() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this hub's page cannot act");
    };
    tracing::info!(%namespace, rollout = %name, verb = verb.name(), %user, "fleet page action");
    match act(client, &namespace, &name, verb, &user, ACT_WAIT).await {
        Ok(outcome) => {
            let line = outcome.line(&name, verb, ACT_WAIT);
            let (status, result) = match &outcome {
                Outcome::Changed | Outcome::Done(_) => (StatusCode::OK, "done"),
                Outcome::Already => (StatusCode::OK, "unchanged"),
                Outcome::Pending => (StatusCode::ACCEPTED, "pending"),
                Outcome::Refused(_) => (StatusCode::CONFLICT, "refused"),
            };
            let body = if status == StatusCode::CONFLICT {
                serde_json::json!({ "error": line, "result": result, "user": user })
            } else {
                serde_json::json!({ "message": line, "result": result, "user": user })
            };
            answer(status, body)
        }
        Err(crate::Error::NotFound(what)) => error(
            StatusCode::NOT_FOUND,
            &format!("{what}: not found (deleted or renamed? reload the page)"),
        ),
        Err(e) => {
            let message = flightnode_proto::error::chain(&e);
            tracing::warn!(%namespace, rollout = %name, verb = verb.name(), %user, error = %message, "fleet page action failed");
            error(
                StatusCode::BAD_GATEWAY,
                &format!("{} failed: {message}", verb.name()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_names_users_and_a_bad_line_says_which() {
        let users = parse_tokens("# ops\n\ns3cret,alice\nt2, bob ,1001,\"ops,admins\"\n", "f").unwrap();
        assert_eq!(users.get(&digest("s3cret")).map(String::as_str), Some("alice"));
        assert_eq!(users.get(&digest("t2")).map(String::as_str), Some("bob"));
        assert_eq!(users.len(), 2);
        let err = parse_tokens("ok,alice\nno-user\n", "f").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(matches!(
            parse_tokens("# nothing\n", "f"),
            Err(TokenFileError::Empty { .. })
        ));
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Basic YTpi".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[tokio::test]
    async fn without_a_way_to_check_tokens_or_without_a_token_it_is_401() {
        let denied = Authority::None
            .authorise(Some("x"), "default", "r")
            .await
            .unwrap_err();
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
        assert!(denied.message.contains("--ui-tokens"), "{}", denied.message);
        let client = crate::store::kube::client_for_url("http://127.0.0.1:9").unwrap();
        let tokens = Authority::Tokens {
            users: parse_tokens("s3cret,alice\n", "f").unwrap(),
            client,
        };
        assert_eq!(
            tokens.authorise(Some("s3cret"), "default", "r").await.unwrap(),
            "alice"
        );
        assert_eq!(
            tokens.authorise(None, "default", "r").await.unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            tokens
                .authorise(Some("wrong"), "default", "r")
                .await
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
    }
}
