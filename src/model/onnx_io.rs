//! Reads the graph inputs and outputs of an ONNX file without loading its weights.
//!
//! An ONNX file is a protobuf `ModelProto`; its `graph` holds the initializers (the
//! weights, most of the file) and the `input`/`output` value infos we need. We walk the
//! protobuf fields and seek over everything else, so a 100 MB model costs a few reads.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
    Unknown,
}

/// A graph input or output: name, ONNX element type (1 = f32, 7 = i64, 9 = bool, 10 = f16)
/// and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    pub dims: Vec<Dim>,
}

pub const ELEM_F32: i32 = 1;
pub const ELEM_I64: i32 = 7;
pub const ELEM_BOOL: i32 = 9;
pub const ELEM_F16: i32 = 10;

/// ONNX's name for a tensor element type, for messages.
pub fn elem_type_name(elem_type: i32) -> String {
    match elem_type {
        1 => "float (f32)".into(),
        7 => "int64".into(),
        9 => "bool".into(),
        10 => "float16 (f16)".into(),
        16 => "bfloat16".into(),
        other => format!("element type {other}"),
    }
}

#[derive(Debug, Default)]
pub struct GraphIo {
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// The operator types of the main graph's nodes (not of subgraphs), with their counts.
    pub op_types: BTreeMap<String, usize>,
}

struct Reader<R> {
    inner: R,
    pos: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn byte(&mut self) -> std::io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        match self.inner.read(&mut b)? {
            0 => Ok(None),
            _ => {
                self.pos += 1;
                Ok(Some(b[0]))
            }
        }
    }

    fn varint(&mut self) -> std::io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?.ok_or_else(|| invalid("truncated varint"))?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(invalid("varint too long"))
    }

    /// Next (field number, wire type) within `end`, or None at the end.
    fn key(&mut self, end: u64) -> std::io::Result<Option<(u64, u8)>> {
        if self.pos >= end {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, (key & 7) as u8)))
    }

    fn skip(&mut self, wire: u8) -> std::io::Result<()> {
        let n = match wire {
            0 => {
                self.varint()?;
                return Ok(());
            }
            1 => 8,
            2 => self.varint()?,
            5 => 4,
            _ => return Err(invalid("unsupported protobuf wire type")),
        };
        if n < 64 * 1024 {
            // Node fields are small and many: read past them in the buffer, where a seek
            // would throw the buffer away each time.
            let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())?;
            if copied != n {
                return Err(invalid("truncated field"));
            }
        } else {
            self.inner.seek(SeekFrom::Current(n as i64))?;
        }
        self.pos += n;
        Ok(())
    }

    fn bytes(&mut self) -> std::io::Result<Vec<u8>> {
        let n = self.varint()?;
        if n > 1 << 20 {
            return Err(invalid("a name field is implausibly long"));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += n;
        Ok(buf)
    }

    fn string(&mut self) -> std::io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| invalid("a name is not UTF-8"))
    }

    /// End offset of a length-delimited field that starts here.
    fn sub_end(&mut self) -> std::io::Result<u64> {
        let n = self.varint()?;
        Ok(self.pos + n)
    }
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads the inputs and outputs of the main graph of an ONNX file.
pub fn read_graph_io(path: &Path) -> std::io::Result<GraphIo> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = Reader {
        inner: BufReader::new(file),
        pos: 0,
    };
    let mut io = GraphIo::default();
    let mut saw_graph = false;
    while let Some((field, wire)) = r.key(len)? {
        if field == 7 && wire == 2 {
            saw_graph = true;
            let end = r.sub_end()?;
            if end > len {
                return Err(invalid("the graph runs past the end of the file"));
            }
            while let Some((field, wire)) = r.key(end)? {
                match (field, wire) {
                    (11, 2) => io.inputs.push(value_info(&mut r)?),
                    (12, 2) => io.outputs.push(value_info(&mut r)?),
                    (1, 2) => {
                        if let Some(op) = node_op_type(&mut r)? {
                            *io.op_types.entry(op).or_default() += 1;
                        }
                    }
                    _ => r.skip(wire)?,
                }
            }
        } else {
            r.skip(wire)?;
        }
    }
    if !saw_graph || io.inputs.is_empty() || io.outputs.is_empty() {
        return Err(invalid(
            "no graph with inputs and outputs found; is this an ONNX model?",
        ));
    }
    Ok(io)
}

/// The `op_type` of one `NodeProto`; its attributes (which may hold constant tensors) are
/// skipped.
fn node_op_type<R: Read + Seek>(r: &mut Reader<R>) -> std::io::Result<Option<String>> {
    let end = r.sub_end()?;
    let mut op_type = None;
    while let Some((field, wire)) = r.key(end)? {
        match (field, wire) {
            (4, 2) => op_type = Some(r.string()?),
            _ => r.skip(wire)?,
        }
    }
    Ok(op_type)
}

fn value_info<R: Read + Seek>(r: &mut Reader<R>) -> std::io::Result<ValueInfo> {
    let end = r.sub_end()?;
    let mut info = ValueInfo {
        name: String::new(),
        elem_type: 0,
        dims: Vec::new(),
    };
    while let Some((field, wire)) = r.key(end)? {
        match (field, wire) {
            (1, 2) => info.name = r.string()?,
            // TypeProto
            (2, 2) => {
                let type_end = r.sub_end()?;
                while let Some((field, wire)) = r.key(type_end)? {
                    if (field, wire) == (1, 2) {
                        tensor_type(r, &mut info)?;
                    } else {
                        r.skip(wire)?;
                    }
                }
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(info)
}

fn tensor_type<R: Read + Seek>(r: &mut Reader<R>, info: &mut ValueInfo) -> std::io::Result<()> {
    let end = r.sub_end()?;
    while let Some((field, wire)) = r.key(end)? {
        match (field, wire) {
            (1, 0) => info.elem_type = r.varint()? as i32,
            // TensorShapeProto: repeated Dimension dim = 1
            (2, 2) => {
                let shape_end = r.sub_end()?;
                while let Some((field, wire)) = r.key(shape_end)? {
                    if (field, wire) != (1, 2) {
                        r.skip(wire)?;
                        continue;
                    }
                    let dim_end = r.sub_end()?;
                    let mut dim = Dim::Unknown;
                    while let Some((field, wire)) = r.key(dim_end)? {
                        match (field, wire) {
                            (1, 0) => dim = Dim::Fixed(r.varint()? as i64),
                            (2, 2) => dim = Dim::Symbol(r.string()?),
                            _ => r.skip(wire)?,
                        }
                    }
                    info.dims.push(dim);
                }
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}
