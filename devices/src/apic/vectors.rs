//! A 256-bit vector set, the layout of IRR, ISR and TMR (eight 32-bit registers).

/// One bit per interrupt vector, stored as the eight 32-bit words the guest reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VectorSet {
    words: [u32; 8],
}

impl VectorSet {
    /// Sets `vector`; returns whether it was already set.
    pub(crate) fn insert(&mut self, vector: u8) -> bool {
        let (word, bit) = Self::position(vector);
        let was_set = self.words[word] & bit != 0;
        self.words[word] |= bit;
        was_set
    }

    /// Clears `vector`.
    pub(crate) fn remove(&mut self, vector: u8) {
        let (word, bit) = Self::position(vector);
        self.words[word] &= !bit;
    }

    /// Sets or clears `vector`.
    pub(crate) fn assign(&mut self, vector: u8, set: bool) {
        if set {
            self.insert(vector);
        } else {
            self.remove(vector);
        }
    }

    /// Whether `vector` is set.
    pub(crate) fn contains(&self, vector: u8) -> bool {
        let (word, bit) = Self::position(vector);
        self.words[word] & bit != 0
    }

    /// The highest set vector, which has the highest priority.
    pub(crate) fn highest(&self) -> Option<u8> {
        self.words
            .iter()
            .enumerate()
            .rev()
            .find_map(|(index, &word)| {
                if word == 0 {
                    return None;
                }
                // `index` < 8 words of 32 bits, so the vector is at most 255 and always fits.
                u8::try_from(index * 32 + 31 - word.leading_zeros() as usize).ok()
            })
    }

    /// The `index`-th 32-bit register (vectors `32 * index ..= 32 * index + 31`).
    pub(crate) fn word(&self, index: usize) -> u32 {
        self.words[index]
    }

    fn position(vector: u8) -> (usize, u32) {
        (usize::from(vector >> 5), 1 << (vector & 31))
    }
}

#[cfg(test)]
mod tests {
    use super::VectorSet;

    #[test]
    fn highest_and_words_follow_the_register_layout() {
        let mut set = VectorSet::default();
        assert_eq!(set.highest(), None);
        assert!(!set.insert(0x21));
        assert!(set.insert(0x21));
        set.insert(0xFF);
        set.insert(0x40);
        assert_eq!(set.highest(), Some(0xFF));
        assert_eq!(set.word(1), 1 << 1);
        assert_eq!(set.word(2), 1);
        assert_eq!(set.word(7), 1 << 31);
        set.remove(0xFF);
        assert_eq!(set.highest(), Some(0x40));
        assert!(set.contains(0x21));
        set.assign(0x21, false);
        assert!(!set.contains(0x21));
        set.assign(0x00, true);
        set.remove(0x40);
        assert_eq!(set.highest(), Some(0x00));
    }
}
