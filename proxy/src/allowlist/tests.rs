//! The list's defined behaviour for the inputs people get wrong, its text
//! format, its changes and its persistence, case by case.

use ipnet::IpNet;

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn bare_addresses_are_host_routes() {
    assert_eq!(parse_cidr("203.0.113.7"), Ok(net("203.0.113.7/32")));
    assert_eq!(parse_cidr("2001:db8::1"), Ok(net("2001:db8::1/128")));
}

#[test]
fn diff_counts_added_removed_and_updated_entries() {
    let old = Allowlist::parse("10.0.0.0/8\n192.0.2.0/24 # a\ndeny 198.51.100.7\n").unwrap();
    let new =
        Allowlist::parse("10.0.0.0/8\n192.0.2.0/24 # b\n2001:db8::/32\n203.0.113.0/24\n").unwrap();
    assert_eq!(old.diff(&new), Diff { added: 2, removed: 1, updated: 1 });
    assert_eq!(new.diff(&new), Diff::default());
    assert_eq!(Allowlist::default().diff(&old), Diff { added: 3, removed: 0, updated: 0 });
}

#[test]
fn changes_are_parsed_once_then_applied_whole_or_refused_with_the_cause() {
    let list = Allowlist::parse("203.0.113.0/24\n").unwrap();
    let add = |cidrs: &[&str], action| {
        let cidrs = cidrs.iter().map(|c| (*c).to_owned()).collect();
        ChangeText::Add { action, cidrs, comment: None }.parse()
    };
    let next = add(&["198.51.100.7", "2001:db8::/32"], Action::Allow).unwrap();
    assert_eq!(next.apply_to(&list).unwrap().len(), 3);
    assert!(matches!(
        add(&["198.51.100.7", "10.0.0.1/8"], Action::Allow),
        Err(Refusal::Cidr(CidrError::HostBitsSet { .. }))
    ));
    assert!(matches!(
        add(&["203.0.113.0/24"], Action::Deny).unwrap().apply_to(&list),
        Err(ChangeError::OtherAction { .. })
    ));
    let remove = ChangeText::Remove { action: Action::Deny, cidrs: vec!["203.0.113.0/24".into()] };
    assert!(matches!(remove.parse().unwrap().apply_to(&list), Err(ChangeError::NotListed { .. })));
    let replace = ChangeText::Replace { text: "allow\n".into() };
    assert!(matches!(replace.parse(), Err(Refusal::Parse(ParseError::Syntax { .. }))));
}

#[test]
fn the_wire_carries_the_text_form_and_parses_it_on_arrival() {
    let text = ChangeText::Replace { text: "192.0.2.0/24 # a partner\ndeny 192.0.2.7\n".into() };
    let change = text.clone().parse().unwrap();
    let wire = serde_json::to_string(&change).unwrap();
    let as_text: ChangeText = serde_json::from_str(&wire).unwrap();
    assert!(matches!(&as_text, ChangeText::Replace { text } if text.contains("# a partner")));
    assert_eq!(serde_json::from_str::<Change>(&wire).unwrap(), change);

    // What the CLI would have refused is refused on arrival too: a CIDR,
    // a list, a comment, an imported entry with host bits.
    let hostile = [
        (r#"{"change":"add","action":"allow","cidrs":["10.0.0.1/8"],"comment":null}"#, "host bits"),
        (r#"{"change":"replace","text":"allow\n"}"#, "line 1"),
        (
            r#"{"change":"add","action":"allow","cidrs":["10.0.0.0/8"],"comment":"a\n0.0.0.0/0"}"#,
            "control character",
        ),
        (
            r#"{"change":"import","entries":[{"cidr":"10.0.0.1/8","action":"allow"}],"tag":"t","replace":false}"#,
            "host bits",
        ),
    ];
    for (wire, why) in hostile {
        let refused = serde_json::from_str::<Change>(wire).unwrap_err().to_string();
        assert!(refused.contains(why), "{wire}: {refused}");
    }
}

#[test]
fn a_comment_cannot_smuggle_an_entry_onto_the_next_line() {
    for comment in ["partner\n0.0.0.0/0", "partner\r", "tab\there", "nul\0"] {
        let add = ChangeText::Add {
            action: Action::Allow,
            cidrs: vec!["198.51.100.7".into()],
            comment: Some(comment.into()),
        };
        assert!(matches!(add.parse(), Err(Refusal::Comment(_))), "{comment:?}");
        let import = ChangeText::Import {
            entries: vec![Entry {
                cidr: net("198.51.100.7/32"),
                action: Action::Allow,
                comment: Some(comment.into()),
            }],
            tag: "learned".into(),
            replace: false,
        };
        assert!(matches!(import.parse(), Err(Refusal::Comment(_))), "{comment:?}");
    }
    let fine = ChangeText::Add {
        action: Action::Allow,
        cidrs: vec!["198.51.100.7".into()],
        comment: Some("partner # ünïcode is fine".into()),
    };
    let next = fine.parse().unwrap().apply_to(&Allowlist::default()).expect("a one-line comment");
    assert_eq!(Allowlist::parse(&next.render()).unwrap(), next);
}

#[test]
fn a_prefix_length_beyond_the_family_says_prefix_length() {
    for (input, max) in
        [("10.0.0.0/33", 32), ("10.0.0.0/", 32), ("10.0.0.0/x", 32), ("2001:db8::/129", 128)]
    {
        let err = parse_cidr(input).unwrap_err();
        assert_eq!(err, CidrError::PrefixLength { input: input.into(), max });
        assert!(err.to_string().contains("prefix length"), "{err}");
    }
    assert_eq!(
        parse_cidr("10.0.0/8"),
        Err(CidrError::Unparsable { input: "10.0.0/8".into() }),
        "the address itself is broken"
    );
}

/// A blank is named as such (it used to be blamed on the prefix length),
/// with the fix, or with what is wrong besides.
#[test]
fn a_blank_says_blank_not_prefix_length() {
    let cases = [
        ("10.0.0.0/8 ", "a trailing space: write `10.0.0.0/8`"),
        (" 10.0.0.0/8", "a leading space: write `10.0.0.0/8`"),
        ("10.0.0.0 /8", "a space: write `10.0.0.0/8`"),
        ("10.0.0.0/8\t", "a trailing tab"),
        ("10.0.0.0/8\r", "`10.0.0.0/8\\r` has a trailing carriage return"),
        ("2001:db8::/32\n", "a trailing line break: write `2001:db8::/32`"),
        ("203.0.113.7/24 ", "and without it, `203.0.113.7/24` has host bits set"),
    ];
    for (input, expected) in cases {
        let err = parse_cidr(input).unwrap_err();
        assert!(matches!(err, CidrError::Whitespace { .. }), "{input:?}: {err:?}");
        let message = err.to_string();
        assert!(message.contains(expected), "{input:?}: {message}");
        assert!(!message.contains("prefix length"), "{input:?}: {message}");
    }
    // CLI arguments and config values reach the same parser; list file
    // lines are split on blanks first, so theirs never get this far.
    let change =
        ChangeText::Add { action: Action::Allow, cidrs: vec!["10.0.0.0/8 ".into()], comment: None };
    assert!(matches!(change.parse(), Err(Refusal::Cidr(CidrError::Whitespace { .. }))));
    assert_eq!(Allowlist::parse("10.0.0.0/8 \r\n").map(|l| l.len()), Ok(1));
}

#[test]
fn host_bits_are_refused_naming_the_network() {
    assert_eq!(
        parse_cidr("203.0.113.7/24"),
        Err(CidrError::HostBitsSet {
            input: "203.0.113.7/24".into(),
            network: net("203.0.113.0/24")
        })
    );
}

#[test]
fn ipv4_mapped_is_refused_naming_the_ipv4_form() {
    let err = parse_cidr("::ffff:203.0.113.0/120").unwrap_err();
    assert_eq!(
        err,
        CidrError::Ipv4Mapped {
            input: "::ffff:203.0.113.0/120".into(),
            ipv4: Some("203.0.113.0/24".parse().unwrap())
        }
    );
    assert!(err.to_string().contains("`203.0.113.0/24`"));
}

#[test]
fn garbage_is_refused() {
    // Bad prefix lengths have their own error (see above).
    for input in ["", "example.com", "203.0.113/24", "1.2.3.4.5"] {
        assert_eq!(
            parse_cidr(input),
            Err(CidrError::Unparsable { input: input.into() }),
            "{input}"
        );
    }
}

#[test]
fn file_format_round_trips() {
    let text = "# header\n203.0.113.0/24  # partner\n\ndeny 203.0.113.66/32\nallow 2001:db8::/32\n";
    let list = Allowlist::parse(text).unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list.get(&net("203.0.113.0/24")).unwrap().comment.as_deref(), Some("partner"));
    assert_eq!(list.get(&net("203.0.113.66/32")).unwrap().action, Action::Deny);
    assert_eq!(Allowlist::parse(&list.render()).unwrap(), list);
}

#[test]
fn file_errors_name_the_line() {
    let err = Allowlist::parse("10.0.0.0/8\n\nallow 10.0.0.300/32\n").unwrap_err();
    assert!(matches!(err, ParseError::Cidr { line: 3, .. }), "{err}");
    let err = Allowlist::parse("permit 10.0.0.0/8\n").unwrap_err();
    assert_eq!(err, ParseError::Syntax { line: 1, text: "permit 10.0.0.0/8".into() });
    let err = Allowlist::parse("10.0.0.0/8\ndeny 10.0.0.0/8\n").unwrap_err();
    assert!(matches!(err, ParseError::Conflict { line: 2, other_line: 1, .. }), "{err}");
}

#[test]
fn explanations_find_the_deciding_entry_and_its_line() {
    let text =
        "# partners\n10.0.0.0/8 # corp\ndeny 10.1.0.0/16\n\n2001:db8::/32\n10.0.0.0/8 # again\n";
    let list = Allowlist::parse(text).unwrap();
    let decide = |addr: &str| list.deciding_entry(addr.parse().unwrap()).map(|e| e.cidr);
    assert_eq!(decide("10.2.3.4"), Some(net("10.0.0.0/8")));
    assert_eq!(decide("10.1.3.4"), Some(net("10.1.0.0/16")), "deny inside allow");
    assert_eq!(decide("2001:db8::1"), Some(net("2001:db8::/32")));
    assert_eq!(decide("192.0.2.1"), None);
    assert_eq!(line_of(text, &net("10.0.0.0/8")), Some(6), "the later line's comment is in force");
    assert_eq!(line_of(text, &net("10.1.0.0/16")), Some(3));
    assert_eq!(line_of(text, &net("2001:db8::/32")), Some(5));
    assert_eq!(line_of(text, &net("192.0.2.0/24")), None);
}

#[test]
fn duplicates_with_the_same_action_collapse() {
    let list = Allowlist::parse("10.0.0.0/8\n10.0.0.0/8 # again\n").unwrap();
    assert_eq!(list.len(), 1);
}

#[test]
fn adding_over_the_other_action_is_refused() {
    let list = Allowlist::parse("deny 10.0.0.1/32\n").unwrap();
    assert_eq!(
        list.with_added(&[net("10.0.0.1/32")], Action::Allow, None),
        Err(ChangeError::OtherAction { cidr: net("10.0.0.1/32"), existing: Action::Deny })
    );
}

#[test]
fn removing_what_is_not_listed_changes_nothing() {
    let list = Allowlist::parse("10.0.0.0/8\n").unwrap();
    let err = list.with_removed(&[net("10.0.0.0/8"), net("10.1.0.0/16")], Action::Allow);
    assert_eq!(
        err,
        Err(ChangeError::NotListed { cidr: net("10.1.0.0/16"), action: Action::Allow })
    );
    assert_eq!(
        list.with_removed(&[net("10.0.0.0/8")], Action::Deny),
        Err(ChangeError::NotListed { cidr: net("10.0.0.0/8"), action: Action::Deny })
    );
}

#[test]
fn imports_merge_and_replace_their_own_entries_only() {
    let list = Allowlist::parse("10.0.0.0/8 # operator\n3.0.0.0/8 # aws-ip-ranges old\n").unwrap();
    let imported = [Entry {
        cidr: net("3.5.0.0/16"),
        action: Action::Allow,
        comment: Some("aws-ip-ranges new".into()),
    }];
    let merged = list.with_imported(&imported, "aws-ip-ranges", false).unwrap();
    assert_eq!(merged.len(), 3);
    let replaced = list.with_imported(&imported, "aws-ip-ranges", true).unwrap();
    let cidrs: Vec<String> = replaced.entries().map(|e| e.cidr.to_string()).collect();
    assert_eq!(cidrs, ["3.5.0.0/16", "10.0.0.0/8"]);
    let denied = Allowlist::parse("deny 3.5.0.0/16\n").unwrap();
    assert_eq!(
        denied.with_imported(&imported, "aws-ip-ranges", false),
        Err(ChangeError::OtherAction { cidr: net("3.5.0.0/16"), existing: Action::Deny })
    );
}

#[test]
fn longest_prefix_decides() {
    let list = Allowlist::parse("203.0.113.0/24\ndeny 203.0.113.64/26\n203.0.113.66/32\n").unwrap();
    assert_eq!(list.verdict("203.0.113.1".parse().unwrap()), Some(Action::Allow));
    assert_eq!(list.verdict("203.0.113.65".parse().unwrap()), Some(Action::Deny));
    assert_eq!(list.verdict("203.0.113.66".parse().unwrap()), Some(Action::Allow));
    assert_eq!(list.verdict("198.51.100.1".parse().unwrap()), None);
}

#[test]
fn store_replaces_the_file_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/allowlist");
    assert!(load(&path, 1).unwrap().is_empty(), "a missing file is an empty list");
    let list = Allowlist::parse("10.0.0.0/8 # lab\n").unwrap();
    store(&path, &list).unwrap();
    assert_eq!(load(&path, 1).unwrap(), list);
    assert!(!dir.path().join("state/allowlist.tmp").exists());
}

#[test]
fn a_file_larger_than_any_list_the_maps_hold_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("allowlist");
    // Two entries per family fit in 2 × 2 × 512 bytes and one more line.
    let fits = "# a comment\n".repeat(2 * 2 * 512 / 12);
    std::fs::write(&path, &fits).unwrap();
    assert!(load(&path, 2).unwrap().is_empty());
    std::fs::write(&path, fits.repeat(2)).unwrap();
    let refused = load(&path, 2).unwrap_err().to_string();
    assert!(refused.contains("longer than the 2560 bytes"), "{refused}");
    // Not text at all.
    std::fs::write(&path, b"10.0.0.0/8 \xff\n").unwrap();
    let refused = load(&path, 2).unwrap_err().to_string();
    assert!(refused.contains("invalid utf-8"), "{refused}");
}
