//! The `admission.k8s.io/v1` AdmissionReview wire format, kept minimal: the
//! request's object stays raw JSON until the decision for its kind parses it
//! into exactly the fields it needs, and every way a body can be malformed
//! maps to a [`ReviewError`] instead of a panic.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

/// The only AdmissionReview version served.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// What can be wrong with a review body.
#[derive(Debug, Error)]
pub enum ReviewError {
    /// Not a JSON AdmissionReview at all; nothing to answer (HTTP 400).
    #[error("body is not an AdmissionReview: {0}")]
    NotAReview(String),
    /// A review whose request cannot be answered because it has no uid (HTTP 400).
    #[error("AdmissionReview has no request uid")]
    NoUid,
    /// A review with a uid that is otherwise unusable; answered with a denial.
    #[error("{message}")]
    Malformed { uid: String, message: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(borrow, default)]
    request: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UidOnly {
    #[serde(default)]
    uid: Option<String>,
}

/// Group, version and kind of the object under review.
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

/// The resource the request addresses.
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
}

/// The operation under review.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

/// The authenticated user who sent the request (`request.userInfo`), as the
/// API server authenticated it.
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// An admission request; `object`/`old_object` are raw JSON.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest<'a> {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub resource: GroupVersionResource,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    #[serde(default)]
    pub user_info: UserInfo,
    #[serde(borrow, default)]
    pub object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub old_object: Option<&'a RawValue>,
    #[serde(default)]
    pub dry_run: Option<bool>,
}

impl AdmissionRequest<'_> {
    /// The raw new object; a denial message when it is absent or null.
    pub fn object(&self) -> Result<&RawValue, String> {
        match self.object {
            Some(raw) if raw.get() != "null" => Ok(raw),
            _ => Err(format!(
                "{:?} of {} without an object",
                self.operation, self.kind.kind
            )),
        }
    }

    /// The raw old object of an UPDATE, if any.
    pub fn old_object(&self) -> Option<&RawValue> {
        self.old_object.filter(|raw| raw.get() != "null")
    }
}

/// Parses a review body. Borrowed from `body`; allocation-light.
pub fn parse(body: &[u8]) -> Result<AdmissionRequest<'_>, ReviewError> {
    let envelope: Envelope<'_> =
        serde_json::from_slice(body).map_err(|e| ReviewError::NotAReview(e.to_string()))?;
    let raw_request = envelope.request.ok_or(ReviewError::NoUid)?;
    let uid = serde_json::from_str::<UidOnly>(raw_request.get())
        .ok()
        .and_then(|u| u.uid)
        .filter(|u| !u.is_empty())
        .ok_or(ReviewError::NoUid)?;
    if envelope.api_version.as_deref() != Some(API_VERSION)
        || envelope.kind.as_deref() != Some("AdmissionReview")
    {
        return Err(ReviewError::Malformed {
            uid,
            message: format!(
                "unsupported review {}/{}: this webhook serves {API_VERSION} AdmissionReview",
                envelope.api_version.as_deref().unwrap_or("<none>"),
                envelope.kind.as_deref().unwrap_or("<none>"),
            ),
        });
    }
    serde_json::from_str(raw_request.get()).map_err(|e| ReviewError::Malformed {
        uid,
        message: format!("malformed AdmissionReview request: {e}"),
    })
}

/// The status of a denial.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub message: String,
    pub reason: &'static str,
}

/// The answer to one request.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// `JSONPatch` when `patch` is set (mutating answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of a JSON Patch (RFC 6902) document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: &'a AdmissionResponse,
}

impl AdmissionResponse {
    /// Serialises the response wrapped in an AdmissionReview.
    pub fn to_review_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ReviewOut {
            api_version: API_VERSION,
            kind: "AdmissionReview",
            response: self,
        })
        // Serialising strings and bools cannot fail.
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_review_without_touching_the_object() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{
            "uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},
            "namespace":"ns","operation":"CREATE","object":{"spec":{"containers":[]}},"oldObject":null}}"#;
        let req = parse(body).unwrap();
        assert_eq!(req.uid, "u1");
        assert_eq!(req.kind.kind, "Pod");
        assert_eq!(req.operation, Operation::Create);
        assert_eq!(req.object().unwrap().get(), r#"{"spec":{"containers":[]}}"#);
        assert!(req.old_object().is_none());
    }

    #[test]
    fn malformed_bodies_map_to_errors() {
        assert!(matches!(
            parse(b"not json"),
            Err(ReviewError::NotAReview(_))
        ));
        assert!(matches!(parse(b"{}"), Err(ReviewError::NoUid)));
        assert!(matches!(
            parse(br#"{"request":{"kind":{}}}"#),
            Err(ReviewError::NoUid)
        ));
        let wrong_version = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u"}}"#;
        match parse(wrong_version) {
            Err(ReviewError::Malformed { uid, message }) => {
                assert_eq!(uid, "u");
                assert!(message.contains("v1beta1"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let no_op = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"kind":"Pod"}}}"#;
        assert!(matches!(parse(no_op), Err(ReviewError::Malformed { .. })));
    }

    #[test]
    fn response_is_a_v1_review() {
        let r = AdmissionResponse {
            uid: "u".into(),
            allowed: false,
            status: Some(Status {
                code: 403,
                message: "no".into(),
                reason: "Forbidden",
            }),
            warnings: vec![],
            patch_type: None,
            patch: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_review_json()).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["response"]["uid"], "u");
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(v["response"]["status"]["code"], 403);
        assert!(v["response"].get("warnings").is_none());
    }
}
