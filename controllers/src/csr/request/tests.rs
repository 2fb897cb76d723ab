//! Each malformed shape of a kubelet client request, one by one.

use super::*;
use confidential_testenv::csr::{NameAttribute, OID_ORGANIZATIONAL_UNIT, RawRequest, StringType};

const USAGES: [&str; 2] = ["digital signature", "client auth"];

fn usages(list: &[&str]) -> Vec<String> {
    list.iter().map(|u| (*u).to_owned()).collect()
}

fn read(pem: &str) -> Result<String, Refusal> {
    kubelet_client_node_name(pem.as_bytes(), &usages(&USAGES))
}

fn raw(request: RawRequest) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    request.pem(&key).expect("request")
}

fn subject(attributes: Vec<NameAttribute>) -> String {
    raw(RawRequest::subject(attributes))
}

fn cn(value: &str) -> NameAttribute {
    NameAttribute::common_name(value)
}

fn org(value: &str) -> NameAttribute {
    NameAttribute::organization(value)
}

/// A request as rcgen (and the kubelet) makes it.
fn rcgen_request(common_name: &str, organization: &str, dns: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, organization);
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

#[test]
fn a_kubelet_request_names_its_node() {
    let pem = rcgen_request("system:node:n1", "system:nodes", &[]);
    assert_eq!(read(&pem), Ok("n1".into()));
    // The same subject built by hand, in any accepted string type.
    for string_type in [
        StringType::Utf8,
        StringType::Printable,
        StringType::T61,
        StringType::Ia5,
        StringType::Bmp,
    ] {
        let pem = subject(vec![
            org("system:nodes").as_type(string_type),
            cn("system:node:n1.example").as_type(string_type),
        ]);
        assert_eq!(read(&pem), Ok("n1.example".into()), "{string_type:?}");
    }
}

#[test]
fn two_common_names_are_refused_in_every_arrangement() {
    let victim = "system:node:victim";
    let shapes = [
        // The reported attack: the signer and Go read the last CN.
        vec![
            vec![cn("system:node:attested")],
            vec![org("system:nodes")],
            vec![cn(victim)],
        ],
        // Multi-valued RDN holding both.
        vec![
            vec![cn("system:node:attested"), cn(victim)],
            vec![org("system:nodes")],
        ],
        // Multi-valued RDN mixing O and the second CN.
        vec![
            vec![cn("system:node:attested")],
            vec![org("system:nodes"), cn(victim)],
        ],
        // The second CN in another encoding.
        vec![
            vec![cn("system:node:attested")],
            vec![org("system:nodes")],
            vec![cn(victim).as_type(StringType::Bmp)],
        ],
        vec![
            vec![cn(victim).as_type(StringType::T61)],
            vec![org("system:nodes")],
            vec![cn("system:node:attested").as_type(StringType::Printable)],
        ],
    ];
    for shape in shapes {
        let pem = raw(RawRequest {
            subject: shape.clone(),
            ..Default::default()
        });
        assert_eq!(read(&pem), Err(Refusal::CommonNameCount(2)), "{shape:?}");
    }
    assert_eq!(
        read(&subject(vec![org("system:nodes")])),
        Err(Refusal::CommonNameCount(0))
    );
}

#[test]
fn organizations_must_be_exactly_system_nodes() {
    for orgs in [
        vec!["system:nodes", "system:masters"],
        vec!["system:masters", "system:nodes"],
        vec!["system:nodes", "system:nodes"],
        vec!["system:masters"],
        vec![],
    ] {
        let mut attributes = vec![cn("system:node:n1")];
        attributes.extend(orgs.iter().map(|o| org(o)));
        assert_eq!(
            read(&subject(attributes)),
            Err(Refusal::Organizations(
                orgs.iter().map(|o| (*o).to_owned()).collect()
            )),
            "{orgs:?}"
        );
    }
    // A second O hidden in a multi-valued RDN.
    let pem = raw(RawRequest {
        subject: vec![
            vec![cn("system:node:n1")],
            vec![org("system:nodes"), org("x")],
        ],
        ..Default::default()
    });
    assert!(matches!(read(&pem), Err(Refusal::Organizations(_))));
}

#[test]
fn other_subject_attributes_are_refused() {
    let pem = subject(vec![
        cn("system:node:n1"),
        org("system:nodes"),
        NameAttribute::new(OID_ORGANIZATIONAL_UNIT, StringType::Utf8, "x"),
    ]);
    assert!(
        matches!(read(&pem), Err(Refusal::ExtraSubjectAttribute(ref a)) if a.contains("organizationalUnit")),
        "{:?}",
        read(&pem)
    );
}

#[test]
fn common_names_that_are_not_node_users_are_refused() {
    for (name, refusal) in [
        ("system:admin", Refusal::NotANodeUser("system:admin".into())),
        (
            "System:node:n1",
            Refusal::NotANodeUser("System:node:n1".into()),
        ),
        ("system:node:", Refusal::InvalidNodeName(String::new())),
        ("system:node:N1", Refusal::InvalidNodeName("N1".into())),
        (
            "system:node:n1\u{0}",
            Refusal::InvalidNodeName("n1\u{0}".into()),
        ),
        ("system:node:a/b", Refusal::InvalidNodeName("a/b".into())),
        ("system:node:-a", Refusal::InvalidNodeName("-a".into())),
    ] {
        let pem = subject(vec![cn(name), org("system:nodes")]);
        assert_eq!(read(&pem), Err(refusal), "{name:?}");
    }
}

#[test]
fn non_text_values_are_refused() {
    // Non-ASCII in a PrintableString; an IA5String O is fine.
    let pem = subject(vec![
        cn("system:node:né").as_type(StringType::Printable),
        org("system:nodes"),
    ]);
    assert!(matches!(read(&pem), Err(Refusal::UnreadableValue { .. })));
    let pem = subject(vec![
        cn("system:node:n1"),
        org("system:nodes").as_type(StringType::Ia5),
    ]);
    assert_eq!(read(&pem), Ok("n1".into()));
}

#[test]
fn subject_alternative_names_are_refused() {
    let pem = rcgen_request("system:node:n1", "system:nodes", &["victim.example"]);
    assert!(
        matches!(read(&pem), Err(Refusal::Extensions(ref e)) if e.contains("subjectAltName")),
        "{:?}",
        read(&pem)
    );
    let pem = raw(RawRequest {
        subject: vec![vec![cn("system:node:n1")], vec![org("system:nodes")]],
        dns_names: vec!["victim".into()],
        ..Default::default()
    });
    assert!(matches!(read(&pem), Err(Refusal::Extensions(_))));
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:node:n1");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    for san in [
        rcgen::SanType::IpAddress(std::net::IpAddr::from([10, 0, 0, 1])),
        rcgen::SanType::Rfc822Name("a@b.example".try_into().expect("email")),
        rcgen::SanType::URI("spiffe://x/y".try_into().expect("uri")),
    ] {
        params.subject_alt_names = vec![san.clone()];
        let pem = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(
            matches!(read(&pem), Err(Refusal::Extensions(_))),
            "{san:?}: {:?}",
            read(&pem)
        );
    }
}

#[test]
fn a_broken_self_signature_is_refused() {
    let pem = raw(RawRequest {
        subject: vec![vec![cn("system:node:n1")], vec![org("system:nodes")]],
        break_signature: true,
        ..Default::default()
    });
    assert!(matches!(read(&pem), Err(Refusal::Signature(_))));
}

#[test]
fn pem_must_be_one_bare_block() {
    let good = rcgen_request("system:node:n1", "system:nodes", &[]);
    let other = rcgen_request("system:node:victim", "system:nodes", &[]);
    for bad in [
        format!("{other}{good}"),
        format!("{good}{other}"),
        format!("junk\n{good}"),
        good.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
        good.replace(
            "-----BEGIN CERTIFICATE REQUEST-----\n",
            "-----BEGIN CERTIFICATE REQUEST-----\nProc-Type: 4,ENCRYPTED\n\n",
        ),
        "not a request".to_owned(),
        String::new(),
    ] {
        assert!(matches!(read(&bad), Err(Refusal::Pem(_))), "{bad}");
    }
    assert!(matches!(
        kubelet_client_node_name(&[0xff, 0xfe], &usages(&USAGES)),
        Err(Refusal::Pem(_))
    ));
    // Valid PEM around something that is not a request.
    let pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    assert!(matches!(read(pem), Err(Refusal::Der(_))));
}

#[test]
fn usages_are_exactly_the_kubelet_client_sets() {
    let pem = rcgen_request("system:node:n1", "system:nodes", &[]);
    for ok in [
        vec!["digital signature", "client auth"],
        vec!["client auth", "digital signature"],
        vec!["digital signature", "key encipherment", "client auth"],
    ] {
        assert_eq!(
            kubelet_client_node_name(pem.as_bytes(), &usages(&ok)),
            Ok("n1".into()),
            "{ok:?}"
        );
    }
    for bad in [
        vec![],
        vec!["client auth"],
        vec!["digital signature"],
        vec!["key encipherment", "client auth"],
        vec!["digital signature", "client auth", "server auth"],
        vec!["digital signature", "client auth", "client auth"],
        vec!["digital signature", "client auth", "cert sign"],
    ] {
        assert_eq!(
            kubelet_client_node_name(pem.as_bytes(), &usages(&bad)),
            Err(Refusal::Usages(usages(&bad))),
            "{bad:?}"
        );
    }
}
