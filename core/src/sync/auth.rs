//! Who may do what: the authenticator hook and per-database grants.

/// A right on a database. Each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Right {
    /// Subscribe (receive deltas, publish presence).
    Read,
    /// Also push entries.
    Write,
    /// Everything, including administration.
    Admin,
}

impl Right {
    /// Parse `read`, `write` or `admin`.
    pub fn parse(s: &str) -> Option<Right> {
        match s {
            "read" => Some(Right::Read),
            "write" => Some(Right::Write),
            "admin" => Some(Right::Admin),
            _ => None,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Admin => "admin",
        }
    }
}

/// One grant: a right on every database whose name matches a glob pattern
/// (`*` matches any run of characters, e.g. `org-42-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The pattern.
    pub pattern: String,
    /// The right.
    pub right: Right,
}

/// What one connection may do, and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    grants: Vec<Grant>,
    /// Unix seconds at which the token stops being valid (`None`: never).
    expires: Option<u64>,
    /// Who the token names (its `sub`), for logs and audit.
    subject: Option<String>,
}

impl Grants {
    /// No rights at all.
    pub fn none() -> Self {
        Grants::default()
    }

    /// Admin on every database.
    pub fn all() -> Self {
        Grants::new(vec![Grant {
            pattern: "*".into(),
            right: Right::Admin,
        }])
    }

    /// From explicit grants.
    pub fn new(grants: Vec<Grant>) -> Self {
        Grants {
            grants,
            expires: None,
            subject: None,
        }
    }

    /// These grants, valid until `unix_secs` (see [`Server::expire`]).
    ///
    /// [`Server::expire`]: crate::sync::Server::expire
    pub fn until(mut self, unix_secs: Option<u64>) -> Self {
        self.expires = unix_secs;
        self
    }

    /// These grants, given to `subject` (a token's `sub`).
    pub fn for_subject(mut self, subject: Option<String>) -> Self {
        self.subject = subject;
        self
    }

    /// Who the token names, if anyone.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// When these grants stop being valid (Unix seconds), if ever.
    pub fn expires(&self) -> Option<u64> {
        self.expires
    }

    /// Add a grant.
    pub fn push(&mut self, grant: Grant) {
        self.grants.push(grant);
    }

    /// Whether `right` is granted on some pattern.
    pub fn any(&self, right: Right) -> bool {
        self.grants.iter().any(|g| g.right >= right)
    }

    /// Whether `right` is granted on `db`.
    pub fn allows(&self, db: &str, right: Right) -> bool {
        self.grants
            .iter()
            .any(|g| g.right >= right && glob_match(&g.pattern, db))
    }
}

/// `*`-only glob matching, iterative (no exponential backtracking).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token and no anonymous access.
    #[error("a token is required")]
    Missing,
    /// The token does not verify.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token has expired.
    #[error("token expired")]
    Expired,
}

/// Turns a `Hello` token into grants. The native server verifies signed
/// tokens; tests use [`OpenAccess`].
pub trait Authenticator {
    /// Verify `token` and say what it grants.
    fn authenticate(&self, token: &str) -> Result<Grants, AuthError>;
}

/// Everyone may do everything: for tests and purely local set-ups.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAccess;

impl Authenticator for OpenAccess {
    fn authenticate(&self, _token: &str) -> Result<Grants, AuthError> {
        Ok(Grants::all())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("demo-*", "demo-todo"));
        assert!(!glob_match("demo-*", "prod"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match(&"*a".repeat(20), &"a".repeat(19)));
    }

    #[test]
    fn rights_nest() {
        let g = Grants::new(vec![Grant {
            pattern: "org-*".into(),
            right: Right::Write,
        }]);
        assert!(g.allows("org-1", Right::Read));
        assert!(g.allows("org-1", Right::Write));
        assert!(!g.allows("org-1", Right::Admin));
        assert!(!g.allows("other", Right::Read));
        assert!(Grants::all().allows("x", Right::Admin));
        assert!(!Grants::none().allows("x", Right::Read));
    }
}
