//! Container image references: parsing `[registry/]repository[:tag][@digest]`
//! the way container runtimes resolve them (Docker Hub default registry and
//! `library/` namespace), and matching repositories against policy patterns.

use thiserror::Error;

/// Why an image reference cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageRefError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid character {0:?} in image reference")]
    InvalidChar(char),
    #[error(
        "invalid digest {0:?}: expected sha256:<64 lower-case hex> or sha512:<128 lower-case hex>"
    )]
    InvalidDigest(String),
    #[error("invalid tag {0:?}")]
    InvalidTag(String),
    #[error("invalid repository {0:?}")]
    InvalidRepository(String),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (`docker.io` when none was given).
    pub registry: String,
    /// Repository path inside the registry (`library/nginx` for `nginx`).
    pub repository: String,
    pub tag: Option<String>,
    /// `algorithm:hex`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses a reference as it appears in a container spec.
    pub fn parse(reference: &str) -> Result<Self, ImageRefError> {
        if reference.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if let Some(c) = reference
            .chars()
            .find(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ImageRefError::InvalidChar(c));
        }
        let (name_tag, digest) = match reference.split_once('@') {
            Some((n, d)) => {
                check_digest(d)?;
                (n, Some(d.to_owned()))
            }
            None => (reference, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let split = last_slash + i;
                let tag = &name_tag[split + 1..];
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                {
                    return Err(ImageRefError::InvalidTag(tag.to_owned()));
                }
                (&name_tag[..split], Some(tag.to_owned()))
            }
            None => (name_tag, None),
        };
        let (registry, repository) = split_registry(name)?;
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, the normalised name.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The normalised name with the tag (`latest` when none was given).
    pub fn name_with_tag(&self) -> String {
        format!(
            "{}:{}",
            self.name(),
            self.tag.as_deref().unwrap_or("latest")
        )
    }
}

fn split_registry(name: &str) -> Result<(String, String), ImageRefError> {
    let invalid = || ImageRefError::InvalidRepository(name.to_owned());
    if name.is_empty() {
        return Err(invalid());
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_owned(), rest.to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    if registry.is_empty() || path.is_empty() {
        return Err(invalid());
    }
    let path_ok = path.split('/').all(|component| {
        !component.is_empty()
            && component.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
    });
    if !path_ok {
        return Err(invalid());
    }
    let path = if registry == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    Ok((registry.to_ascii_lowercase(), path))
}

/// Checks `sha256:<64 hex>` / `sha512:<128 hex>`, lower-case.
pub fn check_digest(digest: &str) -> Result<(), ImageRefError> {
    let bad = || ImageRefError::InvalidDigest(digest.to_owned());
    let (algorithm, hex) = digest.split_once(':').ok_or_else(bad)?;
    let len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(bad()),
    };
    if hex.len() != len
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok(())
}

/// A policy's repository pattern: an exact repository, a prefix ending in
/// `/*`, or `*` for any repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryPattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl RepositoryPattern {
    /// Parses a pattern, normalising it like an image name.
    pub fn parse(pattern: &str) -> Result<Self, ImageRefError> {
        if pattern == "*" {
            return Ok(Self::Any);
        }
        if let Some(prefix) = pattern.strip_suffix("/*") {
            // A prefix is a registry or a repository path; normalise it as a
            // repository without the `library/` expansion.
            let (registry, path) = match prefix.split_once('/') {
                Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                    (first, Some(rest))
                }
                _ if prefix.contains(['.', ':']) || prefix == "localhost" => (prefix, None),
                _ => ("docker.io", Some(prefix)),
            };
            if let Some(path) = path {
                split_registry(&format!("{registry}/{path}/x"))?;
                return Ok(Self::Prefix(format!("{registry}/{path}/")));
            }
            return Ok(Self::Prefix(format!("{registry}/")));
        }
        let parsed = ImageRef::parse(pattern)?;
        if parsed.tag.is_some() || parsed.digest.is_some() {
            return Err(ImageRefError::InvalidRepository(pattern.to_owned()));
        }
        Ok(Self::Exact(parsed.name()))
    }

    /// Whether the normalised `name` (`registry/repository`) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => exact == name,
            Self::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = ImageRef::parse("nginx:latest").unwrap();
        assert_eq!(r.name(), "docker.io/library/nginx");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        let r = ImageRef::parse("bitnami/redis").unwrap();
        assert_eq!(r.name(), "docker.io/bitnami/redis");
        assert_eq!(r.name_with_tag(), "docker.io/bitnami/redis:latest");
    }

    #[test]
    fn registry_with_port_and_digest() {
        let r = ImageRef::parse(&format!("localhost:5000/team/app:v1@{D}")).unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest.as_deref(), Some(D));
        let r = ImageRef::parse(&format!("ghcr.io/acme/app@{D}")).unwrap();
        assert_eq!(r.name(), "ghcr.io/acme/app");
        assert_eq!(r.tag, None);
    }

    #[test]
    fn malformed_references_are_errors() {
        assert_eq!(ImageRef::parse(""), Err(ImageRefError::Empty));
        assert!(matches!(
            ImageRef::parse("nginx@sha256:abc"),
            Err(ImageRefError::InvalidDigest(_))
        ));
        assert!(matches!(
            ImageRef::parse(&format!("nginx@{}", D.to_uppercase().replace("SHA", "sha"))),
            Err(ImageRefError::InvalidDigest(_))
        ));
        assert!(matches!(
            ImageRef::parse("Nginx:1"),
            Err(ImageRefError::InvalidRepository(_))
        ));
        assert!(matches!(
            ImageRef::parse("nginx:"),
            Err(ImageRefError::InvalidTag(_))
        ));
        assert!(matches!(
            ImageRef::parse("ngi nx"),
            Err(ImageRefError::InvalidChar(' '))
        ));
        assert!(ImageRef::parse("ghcr.io//x").is_err());
    }

    #[test]
    fn repository_patterns() {
        let p = RepositoryPattern::parse("nginx").unwrap();
        assert!(p.matches("docker.io/library/nginx"));
        assert!(!p.matches("docker.io/library/nginx2"));
        let p = RepositoryPattern::parse("ghcr.io/acme/*").unwrap();
        assert!(p.matches("ghcr.io/acme/app"));
        assert!(p.matches("ghcr.io/acme/team/app"));
        assert!(!p.matches("ghcr.io/acmeevil/app"));
        let p = RepositoryPattern::parse("registry.example.com/*").unwrap();
        assert!(p.matches("registry.example.com/a/b"));
        assert!(!p.matches("registry.example.community/a"));
        assert!(RepositoryPattern::parse("*").unwrap().matches("x/y"));
        assert!(RepositoryPattern::parse("nginx:1.27").is_err());
        assert!(RepositoryPattern::parse("Bad/*").is_err());
    }
}
