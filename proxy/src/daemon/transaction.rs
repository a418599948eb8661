//! Putting a list in force as one transaction: capacity first, then the
//! file, then the kernel's maps, and on a failure both put back. The two
//! sides are traits so that every failure order is tested without a kernel.

use std::path::Path;

use crate::{
    allowlist::{self, Allowlist, StoreError},
    filter::{Filter, FilterError},
};

/// The kernel's copy of the list: the XDP program's rule maps.
pub trait RuleMaps {
    /// Refuses, before touching anything, a list the maps cannot hold.
    fn check_capacity(&self, list: &Allowlist) -> Result<(), FilterError>;
    /// Makes the maps hold exactly `list`.
    fn apply(&mut self, list: &Allowlist) -> Result<(), FilterError>;
}

impl RuleMaps for Filter {
    fn check_capacity(&self, list: &Allowlist) -> Result<(), FilterError> {
        Filter::check_capacity(self, list)
    }

    fn apply(&mut self, list: &Allowlist) -> Result<(), FilterError> {
        Filter::apply(self, list)
    }
}

/// Where the list survives a restart: its file.
pub trait ListFile {
    fn store(&self, list: &Allowlist) -> Result<(), StoreError>;
}

impl ListFile for Path {
    fn store(&self, list: &Allowlist) -> Result<(), StoreError> {
        allowlist::store(self, list)
    }
}

/// Whether a change is written to the list's file before it is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persist {
    Yes,
    /// The change was read from the file.
    No,
}

/// Puts `next` in place of `current` (the list acknowledged last): capacity,
/// then the file (unless it is where `next` came from), then the maps. On a
/// failure the file and the maps are put back to `current`.
pub fn put_in_force(
    maps: &mut impl RuleMaps,
    file: &(impl ListFile + ?Sized),
    persist: Persist,
    current: &Allowlist,
    next: &Allowlist,
) -> Result<(), ChangeRefused> {
    maps.check_capacity(next).map_err(ChangeRefused::Capacity)?;
    if persist == Persist::Yes {
        file.store(next).map_err(ChangeRefused::Store)?;
    }
    let Err(apply) = maps.apply(next) else {
        return Ok(());
    };
    let restore_file = || match persist {
        Persist::Yes => file.store(current),
        Persist::No => Ok(()),
    };
    let rollback = restore_file()
        .map_err(Rollback::Store)
        .and_then(|()| maps.apply(current).map_err(Rollback::Apply));
    Err(match rollback {
        Ok(()) => ChangeRefused::Apply(apply),
        Err(rollback) => ChangeRefused::RollbackFailed { apply, rollback: Box::new(rollback) },
    })
}

/// Why an allowlist change was not put in force. Nothing changed, but for
/// [`ChangeRefused::RollbackFailed`].
#[derive(Debug, thiserror::Error)]
pub enum ChangeRefused {
    /// The change clashes with the list: an entry listed with the other
    /// action, or not listed at all.
    #[error(transparent)]
    Conflict(#[from] allowlist::ChangeError),
    /// The maps cannot hold the result (checked before anything is touched).
    #[error(transparent)]
    Capacity(FilterError),
    /// The list file could not be written.
    #[error("nothing changed: {0}")]
    Store(#[source] StoreError),
    /// A map update failed; file and maps were put back.
    #[error("nothing changed: {0}")]
    Apply(#[source] FilterError),
    /// A map update failed, and so did putting the previous list back.
    #[error("{apply}; restoring the previous list also failed: {rollback}")]
    RollbackFailed { apply: FilterError, rollback: Box<Rollback> },
}

/// What failed while putting the previous list back.
#[derive(Debug, thiserror::Error)]
pub enum Rollback {
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Apply(FilterError),
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, io};

    use super::*;
    use crate::files::IoError;

    /// Maps that hold what was applied last, and fail the applies and
    /// capacity checks they are told to (counting from 1).
    #[derive(Default)]
    struct FakeMaps {
        held: Allowlist,
        applies: usize,
        failing_applies: Vec<usize>,
        full: bool,
    }

    impl RuleMaps for FakeMaps {
        fn check_capacity(&self, _: &Allowlist) -> Result<(), FilterError> {
            match self.full {
                true => Err(FilterError::Capacity(crate::filter::TooMany {
                    family: crate::filter::Family::Ipv4,
                    needed: 2,
                    capacity: 1,
                })),
                false => Ok(()),
            }
        }

        fn apply(&mut self, list: &Allowlist) -> Result<(), FilterError> {
            self.applies += 1;
            if self.failing_applies.contains(&self.applies) {
                // A failing update may have changed part of the maps.
                self.held = Allowlist::default();
                let source = io::Error::from_raw_os_error(libc::ENOMEM);
                return Err(IoError::new("update", "v4_rules", source).into());
            }
            self.held = list.clone();
            Ok(())
        }
    }

    /// A file that holds what was stored last, failing the stores it is told to.
    #[derive(Default)]
    struct FakeFile {
        held: RefCell<Allowlist>,
        stores: RefCell<usize>,
        failing_stores: Vec<usize>,
    }

    impl ListFile for FakeFile {
        fn store(&self, list: &Allowlist) -> Result<(), StoreError> {
            *self.stores.borrow_mut() += 1;
            if self.failing_stores.contains(&self.stores.borrow()) {
                let source = io::Error::from_raw_os_error(libc::ENOSPC);
                return Err(IoError::new("write", "allowlist", source).into());
            }
            *self.held.borrow_mut() = list.clone();
            Ok(())
        }
    }

    fn lists() -> (Allowlist, Allowlist) {
        let current = Allowlist::parse("allow 192.0.2.0/24\n").unwrap();
        let next = Allowlist::parse("allow 192.0.2.0/24\nallow 198.51.100.7/32\n").unwrap();
        (current, next)
    }

    /// Maps and file both holding `current`, as after the last acknowledged change.
    fn in_force(current: &Allowlist) -> (FakeMaps, FakeFile) {
        let maps = FakeMaps { held: current.clone(), ..FakeMaps::default() };
        let file = FakeFile { held: RefCell::new(current.clone()), ..FakeFile::default() };
        (maps, file)
    }

    #[test]
    fn a_change_reaches_the_file_and_the_maps() {
        let (current, next) = lists();
        let (mut maps, file) = in_force(&current);
        put_in_force(&mut maps, &file, Persist::Yes, &current, &next).unwrap();
        assert_eq!(maps.held, next);
        assert_eq!(*file.held.borrow(), next);
    }

    #[test]
    fn a_list_read_from_the_file_is_not_written_back() {
        let (current, next) = lists();
        let (mut maps, file) = in_force(&current);
        put_in_force(&mut maps, &file, Persist::No, &current, &next).unwrap();
        assert_eq!(maps.held, next);
        assert_eq!(*file.stores.borrow(), 0);
    }

    #[test]
    fn a_list_that_does_not_fit_touches_nothing() {
        let (current, next) = lists();
        let (mut maps, file) = in_force(&current);
        maps.full = true;
        let refused = put_in_force(&mut maps, &file, Persist::Yes, &current, &next);
        assert!(matches!(refused, Err(ChangeRefused::Capacity(_))), "{refused:?}");
        assert_eq!((maps.applies, *file.stores.borrow()), (0, 0));
    }

    #[test]
    fn a_failed_store_leaves_the_maps_alone() {
        let (current, next) = lists();
        let (mut maps, file) = in_force(&current);
        let file = FakeFile { failing_stores: vec![1], ..file };
        let refused = put_in_force(&mut maps, &file, Persist::Yes, &current, &next);
        assert!(matches!(refused, Err(ChangeRefused::Store(_))), "{refused:?}");
        assert_eq!(maps.applies, 0);
        assert_eq!((maps.held, file.held.into_inner()), (current.clone(), current));
    }

    #[test]
    fn a_failed_apply_puts_file_and_maps_back() {
        let (current, next) = lists();
        for persist in [Persist::Yes, Persist::No] {
            let (mut maps, file) = in_force(&current);
            maps.failing_applies = vec![1];
            let refused = put_in_force(&mut maps, &file, persist, &current, &next);
            assert!(matches!(refused, Err(ChangeRefused::Apply(_))), "{persist:?}: {refused:?}");
            assert_eq!(maps.held, current, "{persist:?}");
            assert_eq!(*file.held.borrow(), current, "{persist:?}");
        }
    }

    #[test]
    fn a_failed_rollback_is_reported_as_such() {
        let (current, next) = lists();
        // The second store (putting the file back) fails: the maps are not
        // touched again, and the error names both failures.
        let (mut maps, file) = in_force(&current);
        maps.failing_applies = vec![1];
        let file = FakeFile { failing_stores: vec![2], ..file };
        let refused = put_in_force(&mut maps, &file, Persist::Yes, &current, &next).unwrap_err();
        let ChangeRefused::RollbackFailed { rollback, .. } = &refused else {
            panic!("{refused:?}");
        };
        assert!(matches!(**rollback, Rollback::Store(_)), "{rollback:?}");
        assert_eq!(maps.applies, 1);
        assert!(refused.to_string().contains("restoring the previous list also failed"));

        // The second apply (putting the maps back) fails.
        let (mut maps, file) = in_force(&current);
        maps.failing_applies = vec![1, 2];
        let refused = put_in_force(&mut maps, &file, Persist::Yes, &current, &next).unwrap_err();
        let ChangeRefused::RollbackFailed { rollback, .. } = &refused else {
            panic!("{refused:?}");
        };
        assert!(matches!(**rollback, Rollback::Apply(_)), "{rollback:?}");
        assert_eq!(*file.held.borrow(), current, "the file is put back first");
    }
}
