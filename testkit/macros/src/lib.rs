//! `#[testkit::deadline_test]`: a `#[tokio::test]` whose whole body runs under a deadline.
//!
//! An integration test awaits sockets, processes and other daemons; one await that never ends
//! would hang the run instead of failing it. This attribute gives every test a deadline, so a
//! hang fails that test, by name, with the deadline it broke:
//!
//! ```text
//! #[testkit::deadline_test]                                    // the default deadline, 240 s
//! #[testkit::deadline_test(flavor = "multi_thread", deadline_secs = 60)]
//! ```
//!
//! Every argument but `deadline_secs` is passed on to `#[tokio::test]`. The expansion is
//! `#[::tokio::test(ARGS)] async fn NAME() -> R { ::testkit::within_deadline(D, "NAME",
//! async move BODY).await }`, so a test may return a `Result` or use `return` as before.
//!
//! Written on bare token trees (no `syn`): the only things read are the function's name, its
//! body (the last `{ ... }` group) and the one argument consumed here.
#![warn(missing_docs)]

use proc_macro::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};

/// The deadline of a test that names none: well above the slowest test on a loaded 2-core
/// machine (about 90 s), well below the whole run's backstop in scripts/test.sh.
const DEFAULT_DEADLINE_SECS: u64 = 240;

/// A Tokio test with a deadline; see the crate documentation.
#[proc_macro_attribute]
pub fn deadline_test(args: TokenStream, item: TokenStream) -> TokenStream {
    match expand(args, item) {
        Ok(tokens) => tokens,
        Err(error) => compile_error(&error.to_string()),
    }
}

/// Why the attribute cannot be expanded (a compile error naming it).
#[derive(Debug)]
enum MacroError {
    /// Not on an `async fn`.
    NotAFunction,
    /// The function has no body.
    NoBody,
    /// `deadline_secs = N` with N not a whole number; holds what was written.
    BadDeadline(String),
    /// `deadline_secs = 0`.
    ZeroDeadline,
}

impl std::fmt::Display for MacroError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAFunction => write!(f, "#[testkit::deadline_test] goes on an `async fn`"),
            Self::NoBody => write!(
                f,
                "#[testkit::deadline_test] goes on a function with a body"
            ),
            Self::BadDeadline(value) => {
                write!(f, "deadline_secs = {value}: not a whole number of seconds")
            }
            Self::ZeroDeadline => write!(f, "deadline_secs = 0: a test needs some time"),
        }
    }
}

fn expand(args: TokenStream, item: TokenStream) -> Result<TokenStream, MacroError> {
    let (deadline, tokio_args) = split_args(args)?;
    let mut tokens: Vec<TokenTree> = item.into_iter().collect();
    let name = function_name(&tokens).ok_or(MacroError::NotAFunction)?;
    let body = match tokens.pop() {
        Some(TokenTree::Group(body)) if body.delimiter() == Delimiter::Brace => body,
        _ => return Err(MacroError::NoBody),
    };

    // #[::tokio::test(ARGS)]
    let mut out: Vec<TokenTree> = vec![Punct::new('#', Spacing::Alone).into()];
    let mut attr = path(&["tokio", "test"]);
    attr.push(Group::new(Delimiter::Parenthesis, tokio_args).into());
    out.push(Group::new(Delimiter::Bracket, attr.into_iter().collect()).into());
    out.extend(tokens);

    // { ::testkit::within_deadline(Duration::from_secs(D), "NAME", async move BODY).await }
    let mut call = path(&["testkit", "within_deadline"]);
    let mut call_args = path(&["std", "time", "Duration", "from_secs"]);
    call_args.push(paren(vec![Literal::u64_suffixed(deadline).into()]));
    call_args.push(Punct::new(',', Spacing::Alone).into());
    call_args.push(Literal::string(&name).into());
    call_args.push(Punct::new(',', Spacing::Alone).into());
    call_args.push(Ident::new("async", Span::call_site()).into());
    call_args.push(Ident::new("move", Span::call_site()).into());
    call_args.push(body.into());
    call.push(paren(call_args));
    call.push(Punct::new('.', Spacing::Alone).into());
    call.push(Ident::new("await", Span::call_site()).into());
    out.push(Group::new(Delimiter::Brace, call.into_iter().collect()).into());
    Ok(out.into_iter().collect())
}

/// Takes `deadline_secs = N` out of the arguments; the rest go to `#[tokio::test]`.
fn split_args(args: TokenStream) -> Result<(u64, TokenStream), MacroError> {
    let mut deadline = DEFAULT_DEADLINE_SECS;
    let mut rest: Vec<TokenTree> = Vec::new();
    let tokens: Vec<TokenTree> = args.into_iter().collect();
    for arg in tokens.split(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ',')) {
        match arg {
            [] => {}
            [
                TokenTree::Ident(key),
                TokenTree::Punct(eq),
                TokenTree::Literal(value),
            ] if key.to_string() == "deadline_secs" && eq.as_char() == '=' => {
                deadline = (value.to_string().parse())
                    .map_err(|_| MacroError::BadDeadline(value.to_string()))?;
                if deadline == 0 {
                    return Err(MacroError::ZeroDeadline);
                }
            }
            other => {
                if !rest.is_empty() {
                    rest.push(Punct::new(',', Spacing::Alone).into());
                }
                rest.extend(other.iter().cloned());
            }
        }
    }
    Ok((deadline, rest.into_iter().collect()))
}

/// The identifier after `fn`.
fn function_name(tokens: &[TokenTree]) -> Option<String> {
    let at = tokens
        .iter()
        .position(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "fn"))?;
    match tokens.get(at + 1)? {
        TokenTree::Ident(name) => Some(name.to_string()),
        _ => None,
    }
}

/// `::a::b::c` as tokens.
fn path(segments: &[&str]) -> Vec<TokenTree> {
    let mut out = Vec::new();
    for segment in segments {
        out.push(Punct::new(':', Spacing::Joint).into());
        out.push(Punct::new(':', Spacing::Alone).into());
        out.push(Ident::new(segment, Span::call_site()).into());
    }
    out
}

fn paren(tokens: Vec<TokenTree>) -> TokenTree {
    Group::new(Delimiter::Parenthesis, tokens.into_iter().collect()).into()
}

fn compile_error(message: &str) -> TokenStream {
    let mut out = path(&["core", "compile_error"]);
    out.push(Punct::new('!', Spacing::Alone).into());
    out.push(paren(vec![Literal::string(message).into()]));
    out.push(Punct::new(';', Spacing::Alone).into());
    out.into_iter().collect()
}
