//! The README and `docs/*.md` against the code: every relative link resolves
//! (to a file, and for `#anchor` to one of its headings), every `edgegate …`
//! command in a fenced code block parses with this binary's CLI, every
//! ```` ```toml ```` block and the packaged config parse (also uncommented),
//! and every key the config accepts has a row in docs/configuration.md.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use clap::Parser as _;

use crate::cli::Cli;

/// One Markdown page, split into what the checks read.
struct Page {
    path: PathBuf,
    /// Text outside fenced code blocks, as paragraphs: (first line, text);
    /// a problem in one is reported at its first line.
    paragraphs: Vec<(usize, String)>,
    /// Heading lines outside fenced code blocks.
    headings: Vec<String>,
    /// Fenced code blocks: (info string, first line, lines).
    blocks: Vec<(String, usize, Vec<String>)>,
}

impl Page {
    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut page = Self {
            path: path.to_owned(),
            paragraphs: Vec::new(),
            headings: Vec::new(),
            blocks: Vec::new(),
        };
        let mut fence: Option<(String, String, usize, Vec<String>)> = None;
        let mut paragraph: Option<(usize, String)> = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let trimmed = line.trim_start();
            if let Some((marker, info, start, lines)) = &mut fence {
                if trimmed.trim_end() == marker {
                    page.blocks.push((info.clone(), *start, std::mem::take(lines)));
                    fence = None;
                } else {
                    lines.push(line.to_owned());
                }
                continue;
            }
            if let Some(marker) = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m)) {
                page.paragraphs.extend(paragraph.take());
                let info = trimmed.trim_start_matches(marker).trim().to_owned();
                fence = Some((marker.to_owned(), info, number + 1, Vec::new()));
                continue;
            }
            if trimmed.is_empty() {
                page.paragraphs.extend(paragraph.take());
                continue;
            }
            if let Some(heading) = heading(line) {
                page.headings.push(heading.to_owned());
            }
            let (_, text) = paragraph.get_or_insert_with(|| (number, String::new()));
            text.push_str(line);
            text.push('\n');
        }
        assert!(fence.is_none(), "{}: a code block is not closed", path.display());
        page.paragraphs.extend(paragraph);
        page
    }

    /// The anchors GitHub gives the headings (a repeated one gets `-1`, `-2`, …).
    fn anchors(&self) -> Vec<String> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        self.headings
            .iter()
            .map(|heading| {
                let slug = slug(heading);
                let count = seen.entry(slug.clone()).or_default();
                let anchor = if *count == 0 { slug } else { format!("{slug}-{count}") };
                *count += 1;
                anchor
            })
            .collect()
    }
}

/// The text of an ATX heading line (`## Title`).
fn heading(line: &str) -> Option<&str> {
    let hashes = line.len() - line.trim_start_matches('#').len();
    let rest = &line[hashes..];
    ((1..=6).contains(&hashes) && (rest.is_empty() || rest.starts_with(' ')))
        .then(|| rest.trim().trim_end_matches('#').trim())
}

/// GitHub's anchor for a heading: lower case, punctuation (backticks,
/// brackets, dots, apostrophes, …) removed, each space a hyphen.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// `text` without its inline code spans (a run of backticks up to the
/// next run of the same length), where a `](` is no link.
fn without_code_spans(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].len() - rest[start..].trim_start_matches('`').len();
        let after = &rest[start + ticks..];
        let fence = "`".repeat(ticks);
        let mut search = 0;
        let close = loop {
            match after[search..].find(&fence) {
                Some(at) => {
                    let at = search + at;
                    let run = after[at..].len() - after[at..].trim_start_matches('`').len();
                    if run == ticks {
                        break Some(at);
                    }
                    search = at + run;
                }
                None => break None,
            }
        };
        match close {
            Some(at) => rest = &after[at + ticks..],
            None => {
                out.push_str(&rest[start..start + ticks]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The targets of the inline links and images (`[text](target)`) and of
/// the reference definitions (`[label]: target`) in a paragraph.
fn link_targets(paragraph: &str) -> Vec<String> {
    let text = without_code_spans(paragraph);
    let mut targets: Vec<String> = text
        .match_indices("](")
        .filter_map(|(at, _)| {
            let target = &text[at + 2..];
            let end = target.find([')', ' ', '\n'])?;
            Some(target[..end].trim_matches(['<', '>']).to_owned())
        })
        .collect();
    for line in text.lines() {
        if let Some((label, target)) = line.trim_start().split_once("]: ")
            && label.starts_with('[')
            && !label.contains("](")
        {
            targets.push(target.split_whitespace().next().unwrap_or_default().to_owned());
        }
    }
    targets
}

/// Whether a link target leaves the repository (a URL with a scheme).
fn is_external(target: &str) -> bool {
    target.split_once(':').is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// Words and operators of one shell command line, as `sh` would split
/// it: quotes and backslashes, `#` comments, and `|`, `&`, `;`, `<`,
/// `>` as separators of the commands in it (a redirection's file
/// descriptor, as in `2>`, is dropped with it). `None` for the operators.
fn shell_words(line: &str) -> Result<Vec<Option<String>>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                quoted = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err(format!("unterminated ' in `{line}`")),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                quoted = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err(format!("unterminated \" in `{line}`")),
                        },
                        Some(c) => current.push(c),
                        None => return Err(format!("unterminated \" in `{line}`")),
                    }
                }
            }
            '\\' => {
                if let Some(c) = chars.next() {
                    word.get_or_insert_with(String::new).push(c);
                }
            }
            '#' if word.is_none() => break,
            '|' | '&' | ';' | '<' | '>' => {
                let descriptor = !quoted
                    && word.as_deref().is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()));
                if let Some(finished) = word.take()
                    && !(descriptor && matches!(c, '<' | '>'))
                {
                    words.push(Some(finished));
                }
                quoted = false;
                words.push(None);
            }
            c if c.is_whitespace() => {
                words.extend(word.take().map(Some));
                quoted = false;
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word.map(Some));
    Ok(words)
}

/// The `edgegate …` invocations of a command line: each command between
/// operators whose first word (after `$ `, `sudo [-E]` and `NAME=value`
/// assignments) is `edgegate`.
fn invocations(line: &str) -> Result<Vec<Vec<String>>, String> {
    let words = shell_words(line)?;
    Ok(words
        .split(Option::is_none)
        .filter_map(|command| {
            let mut words =
                command.iter().flatten().map(String::as_str).skip_while(|w| *w == "$").peekable();
            while words.next_if(|w| is_assignment(w)).is_some() {}
            if words.next_if_eq(&"sudo").is_some() {
                while words.next_if(|w| w.starts_with('-') || is_assignment(w)).is_some() {}
            }
            let words: Vec<String> = words.map(str::to_owned).collect();
            (words.first().map(String::as_str) == Some("edgegate")).then_some(words)
        })
        .collect())
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The lines of a code block with `\` continuations joined: (first line, line).
fn logical_lines(start: usize, lines: &[String]) -> Vec<(usize, String)> {
    let mut joined: Vec<(usize, String)> = Vec::new();
    let mut continued = false;
    for (offset, line) in lines.iter().enumerate() {
        let (text, continues) = match line.trim_end().strip_suffix('\\') {
            Some(text) => (text, true),
            None => (line.as_str(), false),
        };
        match joined.last_mut() {
            Some((_, last)) if continued => {
                last.push(' ');
                last.push_str(text.trim_start());
            }
            _ => joined.push((start + offset, text.to_owned())),
        }
        continued = continues;
    }
    joined
}

/// `text` with its commented-out keys and tables (`# key = …`,
/// `# [table]`) switched on, as a reader would uncomment them.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| {
            let body = line.strip_prefix("# ").unwrap_or(line);
            let toml = body.starts_with('[')
                || body.split_once(" = ").is_some_and(|(key, _)| {
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
            format!("{}\n", if toml { body } else { line })
        })
        .collect()
}

/// The keys serde accepts in a table: those its error for an unknown key
/// (`zz_unknown`, added to `table` of `config`) names as expected.
fn accepted_keys(config: &str, table: &str) -> Vec<String> {
    let text = config.replace(table, &format!("{table}\nzz_unknown = 1"));
    let overrides = edgegate::config::Overrides::default();
    let error = edgegate::config::Config::parse(&text, Path::new("keys.toml"), &overrides)
        .expect_err("an unknown key is refused")
        .to_string();
    let expected = error
        .split_once("expected ")
        .unwrap_or_else(|| panic!("serde names the keys it expects: {error}"))
        .1;
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// The workspace's root, where README.md and docs/ are.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("the workspace")
}

/// README.md and every docs/*.md.
fn pages() -> Vec<PathBuf> {
    let root = root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ next to the workspace's Cargo.toml")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut pages = vec![root.join("README.md")];
    pages.extend(docs);
    pages
}

/// What is checked: every command, after `$ `, `sudo` and `NAME=value`,
/// that starts with `edgegate` in any fenced block but ```` ```toml ````,
/// each command of a line (`&&`, `;`, `|`, a redirection end one), `\`
/// continuations joined and `#` comments dropped. Placeholders are not
/// skipped: a command in a code block is written as it would be typed
/// (`<…>` and `…` belong in prose, or in `--help`-style blocks whose
/// lines do not start with `edgegate`). Not checked: a line that is not
/// shell (an unmatched quote, as in `--help` text) and does not start
/// with `edgegate`, and a `#anchor` on a link to a file that is not
/// Markdown.
#[test]
fn docs_links_resolve_and_commands_parse() {
    // The readers themselves, on what the pages hold.
    assert_eq!(slug("EC2's MTU"), "ec2s-mtu");
    assert_eq!(
        slug("Keys in the gate (`bench handshake`, key custody)"),
        "keys-in-the-gate-bench-handshake-key-custody"
    );
    assert_eq!(slug("[listener.backend_tls]"), "listenerbackend_tls");
    assert_eq!(
        link_targets("see [a](a.md#x) and `[b](b.md)`, ![c](img.png)\n[d]: d.md\n"),
        ["a.md#x", "img.png", "d.md"]
    );
    let commands = invocations(
        "sudo -E EDGEGATE_X=1 edgegate allow add 10.0.0.0/8 --comment \"a # b\" # note",
    )
    .unwrap();
    assert_eq!(commands, [["edgegate", "allow", "add", "10.0.0.0/8", "--comment", "a # b"]]);
    let commands =
        invocations("systemctl stop edgegate && edgegate detach | tee log 2>&1 > edgegate.txt")
            .unwrap();
    assert_eq!(commands, [["edgegate", "detach"]]);
    assert_eq!(
        logical_lines(7, &["edgegate allow add 1.2.3.4 \\".into(), "  --wait".into()]),
        [(7, "edgegate allow add 1.2.3.4  --wait".to_owned())]
    );
    let pages: Vec<Page> = pages().iter().map(|path| Page::read(path)).collect();
    let mut anchors: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for page in &pages {
        let path = page.path.canonicalize().expect("the page exists");
        anchors.insert(path, page.anchors());
    }
    let mut problems = Vec::new();
    let (mut links, mut commands, mut configs) = (0, 0, 0);
    for page in &pages {
        let name = page.path.strip_prefix(root()).unwrap_or(&page.path).display().to_string();
        let dir = page.path.parent().expect("a page is in a directory");
        for (line, paragraph) in &page.paragraphs {
            for target in link_targets(paragraph) {
                if is_external(&target) {
                    continue;
                }
                links += 1;
                let (file, anchor) = match target.split_once('#') {
                    Some((file, anchor)) => (file, Some(anchor)),
                    None => (target.as_str(), None),
                };
                let resolved = if file.is_empty() { page.path.clone() } else { dir.join(file) };
                let Ok(resolved) = resolved.canonicalize() else {
                    problems.push(format!("{name}:{line}: link `{target}`: no such file"));
                    continue;
                };
                let Some(anchor) = anchor else { continue };
                match anchors.get(&resolved) {
                    Some(known) if !known.iter().any(|a| a == anchor) => problems.push(format!(
                        "{name}:{line}: link `{target}`: no heading with the anchor \
                         `#{anchor}` in {} (it has: {})",
                        resolved.display(),
                        known.join(", ")
                    )),
                    Some(_) => {}
                    None if resolved.extension().is_some_and(|e| e == "md") => problems.push(
                        format!("{name}:{line}: link `{target}`: not a page this test reads"),
                    ),
                    None => {}
                }
            }
        }
        for (info, start, lines) in &page.blocks {
            if info == "toml" {
                configs += 1;
                let text = lines.join("\n") + "\n";
                for text in [text.clone(), uncommented(&text)] {
                    let overrides = edgegate::config::Overrides::default();
                    if let Err(e) = edgegate::config::Config::parse(&text, &page.path, &overrides) {
                        problems.push(format!("{name}:{start}: ```toml block: {e}"));
                    }
                }
                continue;
            }
            for (line, text) in logical_lines(*start, lines) {
                let found = match invocations(&text) {
                    Ok(found) => found,
                    // Not shell (an apostrophe in `--help` output, say),
                    // unless it reads as an edgegate command.
                    Err(e) => {
                        let first = text.split_whitespace().find(|w| !["$", "sudo"].contains(w));
                        if first == Some("edgegate") {
                            problems.push(format!("{name}:{line}: {e}"));
                        }
                        continue;
                    }
                };
                for words in found {
                    commands += 1;
                    if let Err(e) = Cli::try_parse_from(&words) {
                        use clap::error::ErrorKind;
                        if !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                            let e = e.render().to_string();
                            let first = e.lines().next().unwrap_or_default();
                            problems.push(format!("{name}:{line}: `{}`: {first}", words.join(" ")));
                        }
                    }
                }
            }
        }
    }
    // Every key the config accepts has a row in its table's section of
    // the reference.
    let reference = std::fs::read_to_string(root().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    let listener = "[[listener]]\nname = \"a\"\nbind = \"0.0.0.0:1\"\nbackend = \"b:1\"\n\
                    cert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n";
    let config = format!(
        "[filter]\ninterfaces = [\"eth0\"]\n[daemon]\n[metrics]\n{listener}\
         [listener.backend_tls]\nca = \"ca\"\nserver_name = \"s\"\n\
         [fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\ngroup = \"g\"\n"
    );
    for (table, heading) in [
        ("[filter]", "## [filter]"),
        ("[daemon]", "## [daemon]"),
        ("[metrics]", "## [metrics]"),
        ("[[listener]]", "## [[listener]]"),
        ("[listener.backend_tls]", "### [listener.backend_tls]"),
        ("[fleet]", "## [fleet]"),
    ] {
        let section = reference
            .split_once(&format!("\n{heading}\n"))
            .map(|(_, rest)| rest.split("\n#").next().unwrap_or_default())
            .unwrap_or_default();
        for key in accepted_keys(&config, table) {
            if !section.contains(&format!("\n| `{key}` |")) {
                problems.push(format!(
                    "docs/configuration.md: `{key}` of {table} has no row under `{heading}`"
                ));
            }
        }
    }
    // The config the package ships, as written and uncommented.
    let shipped = include_str!("../dist/edgegate.toml");
    for text in [shipped.to_owned(), uncommented(shipped)] {
        let overrides = edgegate::config::Overrides::default();
        if let Err(e) =
            edgegate::config::Config::parse(&text, Path::new("edgegate.toml"), &overrides)
        {
            problems.push(format!("proxy/dist/edgegate.toml: {e}"));
        }
    }
    let readme_configs = pages[0].blocks.iter().filter(|(info, ..)| info == "toml").count();
    assert!(readme_configs > 0, "the README shows a config");
    assert!(
        links >= 50 && commands >= 20 && configs >= 3,
        "the pages hold more than that: {links} links, {commands} commands, {configs} configs \
         found (a parsing bug?)"
    );
    assert!(
        problems.is_empty(),
        "{} problem(s) in the docs:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
