//! Bearer-token authentication for the coordinator's and the workers' services.
//!
//! A server started with `--auth-token-file FILE` accepts calls carrying
//! `authorization: Bearer TOKEN` for one of the tokens in FILE (one per line; blank lines and
//! lines starting with `#` are ignored), and answers every other call UNAUTHENTICATED. The
//! health service (and reflection) stay open, so probes and load balancers need no token.
//! Tokens are compared by their SHA-256 digests, every stored token each time and without an
//! early exit, so the time a check takes does not depend on how much of a token was right.
//! The token a call carried is its [`Owner`]: a coordinator shows a search only to calls made
//! with the token that started it.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// Who made a call: the index of its token in the token file, or `None` on a server without
/// tokens (where every caller is the same, anonymous owner).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Owner(pub(crate) Option<u32>);

impl Owner {
    /// The owner a call carries (set by [`Tokens::interceptor`]); anonymous when none.
    pub fn of<T>(request: &Request<T>) -> Owner {
        request
            .extensions()
            .get::<Owner>()
            .copied()
            .unwrap_or_default()
    }
}

/// The tokens a server accepts.
#[derive(Clone)]
pub struct Tokens {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} tokens)", self.digests.len())
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equality of two digests in time independent of their contents.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The first token in a token file (what a coordinator sends to its workers).
pub fn read_first_token(path: &Path) -> Result<String, String> {
    Ok(read_tokens(path)?.swap_remove(0))
}

fn read_tokens(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(format!(
            "{}: no token in it (one token per line; blank lines and # comments are ignored)",
            path.display()
        ));
    }
    if let Some(bad) = tokens
        .iter()
        .position(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(format!(
            "{}: token {} has a space or a character that is not printable ASCII (a header \
             cannot carry it)",
            path.display(),
            bad + 1
        ));
    }
    Ok(tokens)
}

impl Tokens {
    /// Reads a token file (one token per line).
    pub fn load(path: &Path) -> Result<Tokens, String> {
        Ok(Tokens::new(read_tokens(path)?))
    }

    /// Accepts exactly `tokens`.
    pub fn new(tokens: impl IntoIterator<Item = String>) -> Tokens {
        Tokens {
            digests: Arc::new(tokens.into_iter().map(|t| digest(t.as_bytes())).collect()),
        }
    }

    /// The owner of a call carrying the `authorization` header `header`, or UNAUTHENTICATED.
    pub fn check(&self, header: Option<&[u8]>) -> Result<Owner, Status> {
        let Some(header) = header else {
            return Err(Status::unauthenticated(
                "this server requires a token: send `authorization: Bearer TOKEN` (with \
                 `arbor search --coordinator`, set ARBOR_TOKEN)",
            ));
        };
        let token = header
            .strip_prefix(b"Bearer ")
            .or_else(|| header.strip_prefix(b"bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer TOKEN`")
            })?;
        let d = digest(token);
        let mut found: Option<u32> = None;
        for (i, t) in self.digests.iter().enumerate() {
            // Every token is compared, whichever matches.
            if same(t, &d) && found.is_none() {
                found = Some(i as u32);
            }
        }
        found
            .map(|i| Owner(Some(i)))
            .ok_or_else(|| Status::unauthenticated("the token is not valid for this server"))
    }

    /// An interceptor that refuses calls without a valid token and marks the others with
    /// their [`Owner`]; with no tokens it lets every call through as the anonymous owner.
    pub fn interceptor(
        tokens: Option<Tokens>,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        move |mut req: Request<()>| {
            if let Some(t) = &tokens {
                let owner = t.check(req.metadata().get("authorization").map(|v| v.as_bytes()))?;
                req.extensions_mut().insert(owner);
            }
            Ok(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_exactly() {
        let t = Tokens::new(["alpha".to_string(), "beta".to_string()]);
        assert_eq!(t.check(Some(b"Bearer beta")).unwrap(), Owner(Some(1)));
        assert_eq!(t.check(Some(b"Bearer alpha")).unwrap(), Owner(Some(0)));
        for bad in [
            &b"Bearer alph"[..],
            b"Bearer alphaa",
            b"alpha",
            b"Bearer ",
            b"Basic alpha",
        ] {
            let e = t.check(Some(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert_eq!(
            t.check(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
