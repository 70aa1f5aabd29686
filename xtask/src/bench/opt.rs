//! Option parsing the bench tasks share: the value an option takes, and a
//! positive count (`--runs N`), so each task's parser only lists its options.

use std::slice::Iter;
use std::str::FromStr;

/// The value after option `arg`, taken from `args`; none left is an error
/// naming the option, followed by the task's `usage`.
pub(super) fn value<'a>(
    args: &mut Iter<'a, String>,
    arg: &str,
    usage: &str,
) -> Result<&'a String, String> {
    args.next()
        .ok_or_else(|| format!("`{arg}` needs a value; {usage}"))
}

/// `s` as a number above zero (the default), or `None` when it is not one.
pub(super) fn positive<T: FromStr + PartialOrd + Default>(s: &str) -> Option<T> {
    s.parse().ok().filter(|n| *n > T::default())
}

/// The count after `--runs`: a number above zero, or the error the tasks
/// give (followed by the task's `usage`).
pub(super) fn runs(s: &str, usage: &str) -> Result<usize, String> {
    positive(s).ok_or_else(|| format!("`--runs` needs a positive count; {usage}"))
}
