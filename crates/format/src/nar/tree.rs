use std::collections::BTreeMap;

use super::NarVisitor;

/// An in-memory file tree: what a NAR describes. Used to build NARs in tests and to read one back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Regular { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    // BTreeMap<Vec<u8>, _> iterates in byte order, which is NAR order.
    Directory(BTreeMap<Vec<u8>, Node>),
}

/// A directory being filled: its name in the parent, and the entries read so far.
type OpenDirectory = (Vec<u8>, BTreeMap<Vec<u8>, Node>);

/// A [`NarVisitor`] that rebuilds the tree (contents in memory: for tests and small NARs only).
#[derive(Default)]
pub struct TreeBuilder {
    stack: Vec<OpenDirectory>,
    pending_name: Vec<u8>,
    root: Option<Node>,
}

impl TreeBuilder {
    pub fn into_tree(self) -> Option<Node> {
        self.root
    }

    fn place(&mut self, node: Node) {
        match self.stack.last_mut() {
            Some((_, entries)) => {
                entries.insert(std::mem::take(&mut self.pending_name), node);
            }
            None => self.root = Some(node),
        }
    }

    fn current_file(&mut self) -> Option<&mut Vec<u8>> {
        let slot = match self.stack.last_mut() {
            Some((_, entries)) => entries.values_mut().next_back(),
            None => self.root.as_mut(),
        };
        match slot {
            Some(Node::Regular { contents, .. }) => Some(contents),
            _ => None,
        }
    }
}

impl NarVisitor for TreeBuilder {
    fn regular(&mut self, executable: bool, _size: u64) {
        self.place(Node::Regular {
            executable,
            contents: Vec::new(),
        });
    }

    fn contents(&mut self, chunk: &[u8]) {
        if let Some(c) = self.current_file() {
            c.extend_from_slice(chunk);
        }
    }

    fn symlink(&mut self, target: &[u8]) {
        self.place(Node::Symlink {
            target: target.to_vec(),
        });
    }

    fn enter_directory(&mut self) {
        self.stack
            .push((std::mem::take(&mut self.pending_name), BTreeMap::new()));
    }

    fn entry(&mut self, name: &[u8]) {
        self.pending_name = name.to_vec();
    }

    fn leave_directory(&mut self) {
        if let Some((name, entries)) = self.stack.pop() {
            self.pending_name = name;
            self.place(Node::Directory(entries));
        }
    }
}
