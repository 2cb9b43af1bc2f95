//! Kernel symbol tables (System.map or /proc/kallsyms lines: "address type name
//! [module]") for naming the code where an instruction could not be completed.

use std::path::Path;
use std::sync::{Arc, RwLock};

/// The VM's symbol table, replaced as a whole when another file is loaded.
pub type SharedSymbols = Arc<RwLock<Option<Arc<SymbolTable>>>>;

/// Sorted (address, name) pairs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SymbolTable {
    symbols: Vec<(u64, String)>,
}

impl SymbolTable {
    /// Parses the text of a System.map or kallsyms file; lines that are not
    /// "hex-address type name" are skipped, and so are absolute and zero addresses.
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let address = u64::from_str_radix(fields.next()?, 16).ok()?;
                let kind = fields.next()?;
                let name = fields.next()?;
                if address == 0 || kind.eq_ignore_ascii_case("a") {
                    return None;
                }
                Some((address, name.to_string()))
            })
            .collect();
        symbols.sort();
        symbols.dedup_by_key(|(address, _)| *address);
        Self { symbols }
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// "name+0xoffset/0xsize" for the symbol containing `address` (the size is the
    /// distance to the next symbol; the last one has none).
    pub fn describe(&self, address: u64) -> Option<String> {
        let index = self.symbols.partition_point(|(start, _)| *start <= address);
        let (start, name) = self.symbols.get(index.checked_sub(1)?)?;
        let offset = address - start;
        Some(match self.symbols.get(index) {
            Some((next, _)) => format!("{name}+{offset:#x}/{:#x}", next - start),
            None => format!("{name}+{offset:#x}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 A VDSO32_PRELINK
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t clac_user
ffffffffc0000000 t helper\t[some_module]
garbage line
";

    #[test]
    fn names_address_with_offset_and_size() {
        let table = SymbolTable::parse(MAP);
        assert_eq!(table.len(), 3);
        assert_eq!(
            table.describe(0xffff_ffff_8100_0010).as_deref(),
            Some("_text+0x10/0x1000")
        );
        assert_eq!(
            table.describe(0xffff_ffff_8100_1004).as_deref(),
            Some("clac_user+0x4/0x3efff000")
        );
        assert_eq!(
            table.describe(0xffff_ffff_c000_0001).as_deref(),
            Some("helper+0x1")
        );
        assert_eq!(table.describe(0x1000), None);
    }
}
