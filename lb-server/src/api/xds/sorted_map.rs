//! [`SortedMap`]: the per-stream map of resource names.

/// A map from resource name, as a vector sorted by name: a stream names one
/// or a few resources per type, and a B-tree's first node alone is about a
/// kilobyte, on every stream, for every type. Envoy's thousands of names
/// stay cheap: lookups are binary searches, and names arrive sorted.
#[derive(Debug)]
pub(super) struct SortedMap<V>(Vec<(String, V)>);

impl<V> Default for SortedMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> SortedMap<V> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub(super) fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub(super) fn insert(&mut self, name: String, value: V) {
        match self.find(&name) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|(name, _)| keep(name));
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(name, _)| name)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, value)| value)
    }
}

impl<V> FromIterator<(String, V)> for SortedMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut entries: Vec<(String, V)> = iter.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // Of equal names the last wins, as when std's maps are collected:
        // the sort is stable, and `dedup_by` keeps the earlier of two, so
        // the later one's value moves into it first.
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        entries.shrink_to_fit();
        Self(entries)
    }
}

impl<'a, V> IntoIterator for &'a SortedMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, V)>,
        fn(&'a (String, V)) -> (&'a String, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(name, value)| (name, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_map_keeps_names_sorted_and_unique() {
        let mut map: SortedMap<u32> = [("b", 2), ("a", 1), ("b", 3), ("c", 4)]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        assert_eq!(map.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map.get("b"),
            Some(&3),
            "the last of duplicates wins, as in std's maps"
        );
        map.insert("ab".to_owned(), 5);
        map.insert("a".to_owned(), 6);
        assert_eq!(map.keys().collect::<Vec<_>>(), ["a", "ab", "b", "c"]);
        assert_eq!(map.get("a"), Some(&6));
        assert_eq!(map.get("zz"), None);
        map.retain(|name| name != "b");
        assert!(!map.contains_key("b"));
        assert_eq!(map.values().copied().collect::<Vec<_>>(), [6, 5, 4]);
        map.clear();
        assert_eq!(map.len(), 0);
    }
}
