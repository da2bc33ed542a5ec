//! Enumerations spelled as one word in config files (`transport = "tcp"`,
//! `service_priority = "normal"`): the spelling both ways, and the list a refusal offers.

/// A choice a config file names by one word.
pub trait ConfigWord: Copy + 'static {
    /// Every choice, in the order the documentation lists them.
    const ALL: &'static [Self];

    /// The spelling used in config files.
    fn as_str(self) -> &'static str;

    /// The choice spelled `text`, if one is.
    fn from_config(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == text)
    }

    /// The spellings as a refusal lists them: `"tcp" or "rdma"`.
    fn choices() -> String {
        let words: Vec<String> = Self::ALL
            .iter()
            .map(|c| format!("{:?}", c.as_str()))
            .collect();
        words.join(" or ")
    }
}
