package ovf

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"strings"
)

// maxDepth bounds nesting so that a hostile descriptor cannot make the tree
// walk (or the decoder's stack) grow without limit; real descriptors nest
// fewer than ten levels.
const maxDepth = 64

// maxElements bounds the tree: each element costs a hundred-odd bytes, so a
// 4 MiB descriptor of empty elements would otherwise cost hundreds of
// megabytes. Real descriptors have a few hundred elements.
const maxElements = 50000

// element is a namespace-resolved XML element. The descriptor is decoded into
// a small tree rather than into tagged structs because OVF 1.x and 2.x put
// the same elements in different namespaces, and exporters disagree about the
// namespaces of the CIM children; a tree lets the walker decide per element.
type element struct {
	name     xml.Name
	attrs    []xml.Attr
	children []*element
	text     strings.Builder
}

// decodeTree parses a whole document. It refuses DOCTYPE declarations
// outright: OVF has no use for them, and refusing them closes the door on
// entity tricks even though encoding/xml does not expand external entities.
func decodeTree(data []byte) (*element, error) {
	dec := xml.NewDecoder(bytes.NewReader(data))
	dec.Strict = true
	// Leaving CharsetReader nil makes the decoder refuse anything that does
	// not declare UTF-8, which every known exporter writes.
	var root *element
	var stack []*element
	count := 0
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, invalid("descriptor is not well-formed XML: %s", oneLine(err.Error()))
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if len(stack) >= maxDepth {
				return nil, invalid("descriptor nests elements deeper than %d levels", maxDepth)
			}
			if count++; count > maxElements {
				return nil, invalid("descriptor has more than %d elements", maxElements)
			}
			e := &element{name: t.Name, attrs: t.Attr}
			if len(stack) == 0 {
				if root != nil {
					return nil, invalid("descriptor has more than one root element")
				}
				root = e
			} else {
				parent := stack[len(stack)-1]
				parent.children = append(parent.children, e)
			}
			stack = append(stack, e)
		case xml.EndElement:
			if len(stack) == 0 {
				return nil, invalid("descriptor has an unbalanced end element")
			}
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) > 0 {
				stack[len(stack)-1].text.Write(t)
			}
		case xml.Directive:
			return nil, invalid("descriptor contains a document type declaration")
		}
	}
	if root == nil {
		return nil, invalid("descriptor has no root element")
	}
	return root, nil
}

// oneLine keeps decoder messages, which may quote input, on a single line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func (e *element) value() string {
	return strings.TrimSpace(e.text.String())
}

// attr returns the attribute in namespace ns, falling back to an unqualified
// attribute: the schema wants ovf:-qualified attributes, but some hand-made
// descriptors omit the prefix and mean the same thing.
func (e *element) attr(ns, local string) string {
	for _, a := range e.attrs {
		if a.Name.Space == ns && a.Name.Local == local {
			return a.Value
		}
	}
	for _, a := range e.attrs {
		if a.Name.Space == "" && a.Name.Local == local {
			return a.Value
		}
	}
	return ""
}

// childrenNamed returns the child elements named local in namespace ns.
func (e *element) childrenNamed(ns, local string) []*element {
	var out []*element
	for _, c := range e.children {
		if c.name.Space == ns && c.name.Local == local {
			out = append(out, c)
		}
	}
	return out
}

func (e *element) child(ns, local string) *element {
	for _, c := range e.children {
		if c.name.Space == ns && c.name.Local == local {
			return c
		}
	}
	return nil
}
