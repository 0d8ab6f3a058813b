//! The projector's progress, one cursor per wildcard, and the pure logic of a batch:
//! which wildcards are scanned together, how their candidates merge into one batch, and
//! where each cursor moves when the batch commits. No I/O here; `projector.rs` runs the
//! queries. The argument for why nothing is skipped is in `docs/projector.md`.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use uuid::Uuid;

/// One origin message selected for projection.
#[derive(Debug, Clone)]
pub struct OriginRow {
    /// Message id.
    pub message_id: Uuid,
    /// Origin stream.
    pub stream: String,
    /// Version in the origin stream.
    pub version: i64,
    /// Global position in the store.
    pub global_position: i64,
    /// When the row was added (UTC, naive).
    pub added_at: NaiveDateTime,
    /// The message's own time, when the writer recorded it (UTC, naive).
    pub occurred_at: Option<NaiveDateTime>,
    /// The message JSON, when asked for or when `occurred_at` is missing.
    pub message: Option<String>,
}

/// Invariant (I) of one wildcard: every message matching it that was visible in
/// `snapshot` and has a global position `<= position` is in the aggregated stream.
/// `snapshot: None` means nothing is known yet: `position` is then below every row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Global position `C`.
    pub position: i64,
    /// The `pg_snapshot` text `S` (`xmin:xmax:xip,...`).
    pub snapshot: Option<String>,
}

impl Cursor {
    /// The cursor of a wildcard never projected: everything lies above it, including
    /// rows written with explicit positions of 0 or below.
    #[must_use]
    pub fn start(lowest_visible: Option<i64>) -> Self {
        Self {
            position: lowest_visible.map_or(0, |m| m.saturating_sub(1).min(0)),
            snapshot: None,
        }
    }
}

/// Where a cursor was written: a cursor speaks only for the aggregated table it was
/// written with, on the cluster whose transaction ids its snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorHome {
    /// The cluster's `system_identifier` (NULL where `pg_control_system()` is revoked).
    pub cluster: Option<i64>,
    /// The aggregated table's OID: a table dropped and created again starts over.
    pub table: Option<i64>,
}

/// A cursor row as stored (`depeche_stream_<agg>_cursor`).
#[derive(Debug, Clone)]
pub struct StoredCursor {
    /// The wildcard it belongs to.
    pub wildcard: String,
    /// Its cursor.
    pub cursor: Cursor,
    /// Where it was written.
    pub home: CursorHome,
}

/// Wildcards whose cursors are equal, scanned by one pair of queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorGroup {
    /// The wildcards (LIKE patterns).
    pub wildcards: Vec<String>,
    /// Their common cursor.
    pub cursor: Cursor,
    /// Whether the stored rows must be (re)written even if nothing moves: a wildcard
    /// without a row, or with a snapshot from another cluster.
    pub rewrite: bool,
}

/// Group the configured `wildcards` by their stored cursors.
///
/// A cursor written elsewhere is treated as absent: one from another cluster (a restored
/// dump, a logical copy: its transaction ids mean nothing here), or for an aggregated
/// table that was dropped and created again since (its rows are gone). The wildcard is
/// scanned again from the start, and the primary key keeps that harmless.
#[must_use]
pub fn group_cursors(
    wildcards: &[String],
    stored: &[StoredCursor],
    here: CursorHome,
    lowest_visible: Option<i64>,
) -> Vec<CursorGroup> {
    let by_wildcard: HashMap<&str, &StoredCursor> =
        stored.iter().map(|s| (s.wildcard.as_str(), s)).collect();
    let mut groups: Vec<CursorGroup> = Vec::new();
    for wildcard in wildcards {
        let (cursor, rewrite) = match by_wildcard.get(wildcard.as_str()) {
            Some(s) if s.home == here => (s.cursor.clone(), false),
            _ => (Cursor::start(lowest_visible), true),
        };
        match groups
            .iter_mut()
            .find(|g| g.cursor == cursor && g.rewrite == rewrite)
        {
            Some(g) => g.wildcards.push(wildcard.clone()),
            None => groups.push(CursorGroup {
                wildcards: vec![wildcard.clone()],
                cursor,
                rewrite,
            }),
        }
    }
    groups.sort_by_key(|g| g.cursor.position);
    groups
}

/// What the two candidate queries of one group returned.
#[derive(Debug, Default)]
pub struct GroupRows {
    /// Candidates above the cursor, within the window, in global-position order.
    pub above: Vec<OriginRow>,
    /// Whether `above` was cut by the query's limit.
    pub above_full: bool,
    /// Candidates at or below the cursor that were not visible in its snapshot.
    pub late: Vec<OriginRow>,
    /// Whether `late` was cut by the query's limit.
    pub late_full: bool,
}

/// One batch, merged from every group's candidates, with where each cursor moves.
#[derive(Debug)]
pub struct MergedBatch {
    /// The rows to project, in global-position order, except that each origin stream's
    /// rows are in version order.
    pub rows: Vec<OriginRow>,
    /// Each group's new position, in group order.
    pub positions: Vec<i64>,
    /// Whether more messages may be waiting.
    pub more: bool,
}

/// Merge the groups' candidates into one batch of at most `limit` rows and compute each
/// group's new cursor position.
///
/// `window_end` is the upper end of the global-position window scanned above each
/// group's cursor (`cursor + window`), `max_visible` the highest global position visible
/// in the batch's snapshot.
///
/// A group's new position `C'` keeps invariant (I) for the batch's snapshot: every
/// candidate of the group at or below `C'` is in this batch. When all of its candidates
/// made it in (no query was cut, no row was left out by the merge), that holds up to the
/// end of its window; otherwise only up to just before the first row it could not take.
#[must_use]
pub fn merge(
    groups: &[CursorGroup],
    fetched: Vec<GroupRows>,
    window: i64,
    limit: usize,
    max_visible: Option<i64>,
) -> MergedBatch {
    let mut bounds: Vec<Option<i64>> = Vec::with_capacity(groups.len());
    let mut highest: Vec<Option<i64>> = Vec::with_capacity(groups.len());
    let mut all: Vec<OriginRow> = Vec::new();
    for rows in fetched {
        let mut bound: Option<i64> = None;
        for (full, part) in [(rows.above_full, &rows.above), (rows.late_full, &rows.late)] {
            if let (true, Some(last)) = (full, part.last()) {
                bound = Some(bound.map_or(last.global_position, |b| b.min(last.global_position)));
            }
        }
        bounds.push(bound);
        highest.push(
            rows.above
                .iter()
                .chain(&rows.late)
                .map(|r| r.global_position)
                .max(),
        );
        all.extend(rows.above);
        all.extend(rows.late);
    }
    all.sort_by_key(|r| r.global_position);
    // Overlapping wildcards in different groups return the same row twice.
    all.dedup_by(|a, b| a.message_id == b.message_id);

    // The first row left out. A group lost rows to the cut if it returned any row at or
    // after it, whichever group's copy of a shared row survived the deduplication.
    let cut = all.get(limit).map(|r| r.global_position);
    all.truncate(limit);
    let left_out: Vec<bool> = highest
        .iter()
        .map(|h| matches!((h, cut), (Some(h), Some(c)) if *h >= c))
        .collect();

    let mut more = false;
    let positions = groups
        .iter()
        .enumerate()
        .map(|(index, group)| {
            let c = group.cursor.position;
            let end = c.saturating_add(window);
            let mut bound = bounds[index];
            if left_out[index] {
                let before_cut = cut.map_or(end, |g| g - 1);
                bound = Some(bound.map_or(before_cut, |b| b.min(before_cut)));
            }
            if let Some(b) = bound {
                more = true;
                b.min(end)
            } else {
                if max_visible.is_some_and(|m| m > end) {
                    more = true;
                }
                max_visible.map_or(c, |m| m.min(end)).max(c)
            }
        })
        .collect();

    restore_version_order(&mut all);
    MergedBatch {
        rows: all,
        positions,
        more,
    }
}

/// Put each origin stream's rows in version order, keeping the slots the stream's rows
/// occupy. Writers draw global positions in version order (the store's sequence has
/// `CACHE 1`, checked before every batch), so this only acts on rows written with
/// explicit positions out of order (data-fix scripts, imports).
pub fn restore_version_order(rows: &mut [OriginRow]) {
    let mut slots: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut disordered = false;
    for (i, row) in rows.iter().enumerate() {
        let entry = slots.entry(row.stream.as_str()).or_default();
        if let Some(&previous) = entry.last() {
            disordered |= rows[previous].version > row.version;
        }
        entry.push(i);
    }
    if !disordered {
        return;
    }
    let slots: Vec<Vec<usize>> = slots.into_values().filter(|s| s.len() > 1).collect();
    for indices in slots {
        let mut taken: Vec<OriginRow> = indices.iter().map(|&i| rows[i].clone()).collect();
        taken.sort_by_key(|r| r.version);
        for (slot, row) in indices.into_iter().zip(taken) {
            rows[slot] = row;
        }
    }
}

/// The `xmax` part of a `pg_snapshot` text (`xmin:xmax:xip,...`).
#[must_use]
pub fn snapshot_xmax(snapshot: &str) -> Option<u64> {
    snapshot.split(':').nth(1).and_then(|x| x.parse().ok())
}

/// The in-progress ids (`xip`) of a `pg_snapshot` text, as decimal strings.
#[must_use]
pub fn snapshot_xip(snapshot: &str) -> Vec<String> {
    snapshot
        .split(':')
        .nth(2)
        .unwrap_or_default()
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

/// How many transaction ids may start after a cursor's snapshot before an idle batch
/// rewrites it anyway: the late-commit probe reads the rows of every transaction that
/// started after the snapshot, so an old snapshot makes idle batches slower.
pub const SNAPSHOT_REFRESH_XIDS: u64 = 256;

/// Whether the stored cursors must be written although no position moved.
#[must_use]
pub fn snapshot_stale(stored: Option<&str>, now: &str) -> bool {
    match (stored.and_then(snapshot_xmax), snapshot_xmax(now)) {
        (Some(then), Some(now)) => now.saturating_sub(then) > SNAPSHOT_REFRESH_XIDS,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(gp: i64, stream: &str, version: i64) -> OriginRow {
        OriginRow {
            message_id: Uuid::from_u128(gp as u128),
            stream: stream.into(),
            version,
            global_position: gp,
            added_at: NaiveDateTime::default(),
            occurred_at: None,
            message: None,
        }
    }

    fn group(wildcards: &[&str], position: i64) -> CursorGroup {
        CursorGroup {
            wildcards: wildcards.iter().map(|w| (*w).to_string()).collect(),
            cursor: Cursor {
                position,
                snapshot: Some("10:10:".into()),
            },
            rewrite: false,
        }
    }

    const HERE: CursorHome = CursorHome {
        cluster: Some(1),
        table: Some(16384),
    };

    fn stored(wildcard: &str, position: i64, home: CursorHome) -> StoredCursor {
        StoredCursor {
            wildcard: wildcard.into(),
            cursor: Cursor {
                position,
                snapshot: Some("5:9:7".into()),
            },
            home,
        }
    }

    #[test]
    fn wildcards_with_equal_cursors_share_a_group() {
        let wildcards = vec!["a-%".to_string(), "b-%".to_string(), "c-%".to_string()];
        let groups = group_cursors(
            &wildcards,
            &[stored("a-%", 40, HERE), stored("b-%", 40, HERE)],
            HERE,
            Some(1),
        );
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].wildcards, vec!["c-%"]);
        assert_eq!(groups[0].cursor, Cursor::start(Some(1)));
        assert_eq!(groups[0].cursor.position, 0);
        assert!(groups[0].rewrite);
        assert_eq!(groups[1].wildcards, vec!["a-%", "b-%"]);
        assert_eq!(groups[1].cursor.position, 40);
        assert!(!groups[1].rewrite);
    }

    #[test]
    fn a_new_cursor_starts_below_rows_with_explicit_low_positions() {
        assert_eq!(Cursor::start(Some(-5)).position, -6);
        assert_eq!(Cursor::start(Some(0)).position, -1);
        assert_eq!(Cursor::start(Some(700)).position, 0);
        assert_eq!(Cursor::start(None).position, 0);
        assert_eq!(Cursor::start(Some(i64::MIN)).position, i64::MIN);
    }

    #[test]
    fn a_cursor_from_another_cluster_or_table_starts_over() {
        let wildcards = vec!["a-%".to_string()];
        for elsewhere in [
            CursorHome {
                cluster: Some(2),
                ..HERE
            },
            CursorHome {
                table: Some(20000),
                ..HERE
            },
        ] {
            let groups = group_cursors(&wildcards, &[stored("a-%", 40, elsewhere)], HERE, None);
            assert_eq!(groups[0].cursor, Cursor::start(None));
            assert!(groups[0].rewrite);
        }
    }

    #[test]
    fn an_uncut_batch_moves_to_the_window_end_or_the_newest_row() {
        let groups = [group(&["a-%"], 100)];
        let fetched = vec![GroupRows {
            above: vec![row(101, "a-1", 1), row(150, "a-2", 1)],
            late: vec![row(50, "a-3", 1)],
            ..GroupRows::default()
        }];
        let m = merge(&groups, fetched, 1000, 10, Some(300));
        assert_eq!(
            m.rows.iter().map(|r| r.global_position).collect::<Vec<_>>(),
            [50, 101, 150]
        );
        assert_eq!(m.positions, [300]);
        assert!(!m.more);

        let m = merge(&groups, vec![GroupRows::default()], 1000, 10, Some(5000));
        assert_eq!(m.positions, [1100]);
        assert!(m.more);
    }

    #[test]
    fn a_cut_moves_each_group_only_to_before_its_first_row_left_out() {
        // Group 0 (new wildcard) catches up from 0; group 1 is current at 1000.
        let groups = [group(&["loan-%"], 0), group(&["acc-%"], 1000)];
        let fetched = vec![
            GroupRows {
                above: vec![
                    row(3, "loan-1", 1),
                    row(7, "loan-1", 2),
                    row(9, "loan-2", 1),
                ],
                above_full: true,
                ..GroupRows::default()
            },
            GroupRows {
                above: vec![row(1001, "acc-1", 1)],
                ..GroupRows::default()
            },
        ];
        let m = merge(&groups, fetched, 4096, 3, Some(1001));
        assert_eq!(m.rows.len(), 3);
        // Group 0's query was cut at 9: everything up to 9 is in the batch.
        assert_eq!(m.positions[0], 9);
        // Group 1 lost its row to the cut: it stays just below it.
        assert_eq!(m.positions[1], 1000);
        assert!(m.more);
    }

    #[test]
    fn a_group_untouched_by_the_cut_advances() {
        let groups = [group(&["loan-%"], 0), group(&["acc-%"], 1000)];
        let fetched = vec![
            GroupRows {
                above: vec![row(3, "loan-1", 1), row(7, "loan-1", 2)],
                above_full: true,
                ..GroupRows::default()
            },
            GroupRows::default(),
        ];
        let m = merge(&groups, fetched, 4096, 2, Some(1500));
        assert_eq!(m.positions, [7, 1500]);
    }

    #[test]
    fn overlapping_groups_do_not_duplicate_rows() {
        let groups = [group(&["acc-1%"], 0), group(&["acc-%"], 0)];
        let fetched = vec![
            GroupRows {
                above: vec![row(5, "acc-12", 1)],
                ..GroupRows::default()
            },
            GroupRows {
                above: vec![row(5, "acc-12", 1), row(6, "acc-2", 1)],
                ..GroupRows::default()
            },
        ];
        let m = merge(&groups, fetched, 100, 10, Some(6));
        assert_eq!(m.rows.len(), 2);
        assert_eq!(m.positions, [6, 6]);
    }

    #[test]
    fn a_shared_row_left_out_holds_back_every_group_that_returned_it() {
        // acc-% (at 1) and %-1 (new) both return acc-1 at 4, which the cut leaves out;
        // the deduplication keeps %-1's copy, yet acc-%'s cursor must stay below it too.
        let groups = [group(&["%-1"], 0), group(&["acc-%"], 1)];
        let fetched = vec![
            GroupRows {
                above: vec![row(2, "loan-1", 1), row(4, "acc-1", 1)],
                above_full: true,
                ..GroupRows::default()
            },
            GroupRows {
                above: vec![row(3, "acc-2", 1), row(4, "acc-1", 1)],
                above_full: true,
                ..GroupRows::default()
            },
        ];
        let m = merge(&groups, fetched, 1024, 2, Some(4));
        assert_eq!(
            m.rows.iter().map(|r| r.global_position).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(m.positions, [3, 3]);
        assert!(m.more);
    }

    #[test]
    fn late_rows_below_the_cursor_can_move_it_back() {
        let groups = [group(&["a-%"], 100)];
        let fetched = vec![GroupRows {
            late: vec![row(10, "a-1", 1), row(20, "a-2", 1)],
            late_full: true,
            ..GroupRows::default()
        }];
        let m = merge(&groups, fetched, 100, 2, Some(200));
        assert_eq!(m.positions, [20]);
        assert!(m.more);
    }

    #[test]
    fn versions_are_put_in_order_within_a_stream() {
        let mut rows = vec![
            row(1, "a", 2),
            row(2, "b", 1),
            row(3, "a", 1),
            row(4, "a", 3),
        ];
        restore_version_order(&mut rows);
        let got: Vec<(i64, &str, i64)> = rows
            .iter()
            .map(|r| (r.global_position, r.stream.as_str(), r.version))
            .collect();
        assert_eq!(got, [(3, "a", 1), (2, "b", 1), (1, "a", 2), (4, "a", 3)]);
    }

    #[test]
    fn snapshots_are_parsed() {
        assert_eq!(snapshot_xmax("745:750:745,748"), Some(750));
        assert_eq!(snapshot_xip("745:750:745,748"), ["745", "748"]);
        assert!(snapshot_xip("10:10:").is_empty());
    }

    #[test]
    fn stale_snapshots_are_refreshed() {
        assert!(!snapshot_stale(Some("100:110:"), "100:300:"));
        assert!(snapshot_stale(Some("100:110:"), "100:400:"));
        assert!(snapshot_stale(None, "1:2:"));
    }
}
